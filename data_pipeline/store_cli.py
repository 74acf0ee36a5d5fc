"""`python -m data_pipeline ls|gc --cache-root DIR`: list a transfer-set store, or remove its sets that no
output_dir links to any more (data_pipeline/store.py).

Neither loads Beam or torch: they read manifests and links only.
"""

from __future__ import annotations

import argparse
import json

from data_pipeline.store import gc, human_size, ls
from kdlib.runtime.cli import exit_code_of, stage_parser

COMMANDS = {
    "ls": "`python -m data_pipeline ls --cache-root DIR`: list the store's transfer sets: key, state, size, rows, "
          "tokens, teacher, what is cached, input, created, and the output_dirs that link to each",
    "gc": "`python -m data_pipeline gc --cache-root DIR [--dry-run]`: remove the store's transfer sets that no "
          "output_dir links to any more; a set being built is skipped",
}


def _flags(command: str):
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cache-root", required=True, metavar="DIR", help="the store folder (cache_root)")
        if command == "ls":
            parser.add_argument("--json", action="store_true", help="print the list as JSON")
        else:
            parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    return add


def cached_text(cached: dict) -> str:
    """'top_k 8, hidden_layers [2], pooled mean': the manifest's `cached` entries that are set."""
    shown = ("top_k", "sampled_tokens", "dense_logits", "hidden_layers", "qkv_layers", "pooled", "mlm", "text",
             "char_offsets")
    return ", ".join(f"{k} {cached[k]}" if cached[k] is not True else k for k in shown if cached.get(k)) or "-"


def print_table(sets: list[dict]) -> None:
    rows = [("key", "state", "size", "rows", "tokens", "teacher", "caches", "input", "created")]
    for s in sets:
        teacher = f"{s['teacher'] or '-'}" + (f" ({s['model_type']})" if s["model_type"] else "")
        rows.append((s["key"][:12], s["state"], human_size(s["bytes"]), f"{s['rows']:,}" if s["rows"] is not None
                     else "-", f"{s['tokens']:,}" if s["tokens"] is not None else "-", teacher,
                     cached_text(s["cached"]), s["input"] or "-", s["created"] or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i:
            for ref in sets[i - 1]["references"]:
                print(f"  <- {ref}")
    print(f"{len(sets)} set{'s' if len(sets) != 1 else ''}, {human_size(sum(s['bytes'] for s in sets))}")


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    args = stage_parser(f"data_pipeline {command}", COMMANDS[command], config=False,
                        flags=_flags(command)).parse_args(rest)

    def work():
        if command == "ls":
            sets = ls(args.cache_root)
            print(json.dumps(sets, indent=1)) if args.json else print_table(sets)
            return
        done = gc(args.cache_root, dry_run=args.dry_run)
        for d in done:
            print(f"{d['action']:<12}  {d['key'][:12]}  {human_size(d['bytes']):>9}  {d['why']}")
        gone = [d for d in done if d["action"] in ("removed", "would remove")]
        verb = "would free" if args.dry_run else "freed"
        print(f"gc: {len(gone)} of {len(done)} set(s) {'would be ' if args.dry_run else ''}removed, {verb} "
              f"{human_size(sum(d['bytes'] for d in gone))}")
    return exit_code_of(work)
