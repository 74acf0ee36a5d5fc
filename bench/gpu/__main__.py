"""`python -m bench.gpu [--only PARTS] [--batch 32] [--seconds 20] [--out FILE] [--dry-run]`: the one-command GPU
check: bf16 KD-step throughput and MFU, chunked vs dense KD at a 128k vocabulary, NCCL ZeRO-2 on every GPU, and the
online-teacher step.

Four parts, each timed for --seconds after warm-up steps, each on its own (a part that fails prints its error and
the others still run):
  pretrain  the bf16 KD step (student forward + backward + AdamW; kd_topk on cached-teacher-like random top-32
            targets) of a 6x384 and a 12x768 BertForMaskedLM student built from configs: tokens/s and MFU
  chunked   bench.kd_chunked's output-layer steps at a 131,072 vocabulary: ms and torch.cuda.max_memory_allocated
  zero2     the 12x768 KD step under DeepSpeed ZeRO-2, bf16, NCCL, torchrun on every GPU (one GPU: world size 1)
  online    the 6x384 student's step with a 12x768 teacher run inside it, against the cached-target step
MFU = (6 x parameters x tokens + 12 x layers x sequence x hidden x tokens) / step time / peak dense bf16 FLOP/s of
the device (bench/gpu/plan.py's table; --peak-tflops overrides). The results are printed as a table and written as
JSON (device, torch / CUDA / DeepSpeed versions, date, every part); an existing --out is refused without --force.
Exit status: 0 every part ran, 1 a part failed, 2 bad arguments, --out exists, or no CUDA device (--dry-run prints
the plan without one).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from bench.gpu import zero
from bench.gpu.plan import FORMULA, PARTS, SEQ, Settings, peak_tflops, plan_lines, table
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.io import atomic_write_text

DEFAULT_OUT = "runs/bench/gpu_results.json"  # runs/ is git-ignored: a check never overwrites a tracked file


def flags(parser) -> None:
    parser.add_argument("--only", default="", metavar="PARTS",
                        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--batch", type=int, default=32, help="rows of 128 tokens per step, per GPU (default: 32)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="timed seconds per part, after the warm-up (default: 20; the whole check then takes "
                             "about 3 minutes on one H100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (default: 3)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="one GPU's peak dense bf16 TFLOP/s for MFU (default: from the device's name)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the JSON results file (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (parts, sizes, commands) and exit; "
                                                               "touches no GPU")


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def check_arguments(args) -> tuple[list[str], str | None]:
    """(the parts to run in their order, None) or ([], the one-line problem)."""
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in dict.fromkeys(names) if n not in PARTS]
    if unknown:
        return [], f"--only: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}"
    for flag, value, ok, expected in (("--batch", args.batch, args.batch >= 1, "an integer >= 1"),
                                      ("--seconds", args.seconds, args.seconds > 0, "a number > 0"),
                                      ("--warmup", args.warmup, args.warmup >= 0, "an integer >= 0"),
                                      ("--peak-tflops", args.peak_tflops,
                                       args.peak_tflops is None or args.peak_tflops > 0, "a number > 0")):
        if not ok:
            return [], f"{flag}: expected {expected}, got {value}"
    return [p for p in PARTS if not names or p in names], None


def environment(torch) -> dict:
    """Device, GPU count, versions and the date: what a reader needs to compare figures."""
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": version("deepspeed"), "transformers": version("transformers"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_part(name: str, settings: Settings, device) -> dict:
    if name == "zero2":
        return zero.launch(settings)
    # the measurements' modules (torch, transformers, kdlib's training core: ~8 s): imported once the arguments and
    # the device are known, so --help, --dry-run and argument errors answer at once
    from bench.gpu import steps

    return steps.PARTS[name](settings, device)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("bench.gpu", __doc__, config=False, flags=flags)
    args = parser.parse_args(argv)
    parts, problem = check_arguments(args)
    if problem:
        return error(problem)
    out = Path(args.out)
    if args.dry_run:
        settings = Settings(args.batch, args.seconds, args.warmup, args.peak_tflops)
        print("python -m bench.gpu: the plan (dry run; no GPU touched)")
        note = " (exists: refused without --force)" if out.exists() and not args.force else ""
        print("\n".join(plan_lines(parts, settings, f"{out}{note}",
                                   " ".join(zero.command(settings, "<temporary file>", "<GPUs found>")))))
        return 0
    if out.exists() and not args.force:
        return error(f"--out {out}: the file exists; pass --force to overwrite it, or name another file")
    import torch  # ~3.5 s: the checks above (and --help) run without it

    if not torch.cuda.is_available():
        return error(f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
                     "`python -m bench.gpu --dry-run` prints the plan without one")
    env = environment(torch)
    known = peak_tflops(env["device"])
    peak = args.peak_tflops or (known[1] if known else None)
    source = "--peak-tflops" if args.peak_tflops else (f"table: {known[0]}" if known else None)
    settings = Settings(args.batch, args.seconds, args.warmup, peak, env["gpus"])
    print(f"bench.gpu on {env['device']} x {env['gpus']}, torch {env['torch']} (CUDA {env['cuda']}), deepspeed "
          f"{env['deepspeed']}, {env['date']}")
    print(FORMULA)
    print(f"peak: {peak:g} TFLOP/s per GPU ({source})" if peak else
          f"peak: unknown for {env['device']!r}: no MFU (pass --peak-tflops)", flush=True)
    results, rows, device = {}, [], torch.device("cuda", 0)
    for i, name in enumerate(parts, 1):
        print(f"\n[bench.gpu {i}/{len(parts)}] {name}: {PARTS[name]}", flush=True)
        started, result = time.perf_counter(), None
        try:
            result = run_part(name, settings, device)
        except Exception as err:  # noqa: BLE001 -- one part's failure (OOM, NCCL, a bug) must not stop the others
            trace = traceback.format_exc()
            print(trace, file=sys.stderr)
            print(f"[bench.gpu {i}/{len(parts)}] {name}: FAILED: {type(err).__name__}: {err}", flush=True)
            results[name] = {"ok": False, "seconds": time.perf_counter() - started,
                             "error": f"{type(err).__name__}: {err}", "traceback": trace}
        if result is None:  # the exception and its frames are gone now: free what the part held for the next one
            gc.collect()
            torch.cuda.empty_cache()
            continue
        results[name] = {"ok": True, "seconds": time.perf_counter() - started, **result}
        rows += result["rows"]
        print(table(result["rows"]))
        for note in result.get("notes", []):
            print(f"  {note}")
        print(f"[bench.gpu {i}/{len(parts)}] {name}: ok in {results[name]['seconds']:.0f} s", flush=True)
    failed = [name for name, r in results.items() if not r["ok"]]
    print(f"\n== bench.gpu summary: {env['device']} x {env['gpus']}, batch {settings.batch} x {SEQ} per GPU\n")
    print(table(rows))
    print(f"\n{FORMULA}; peak {f'{peak:g} TFLOP/s per GPU ({source})' if peak else 'unknown: no MFU'}")
    report = {**env, "command": "python -m bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {"batch": settings.batch, "sequence": SEQ, "seconds": settings.seconds,
                           "warmup": settings.warmup, "parts": parts},
              "peak_tflops": peak, "peak_source": source, "formula": FORMULA, "failed": failed, "parts": results}
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"results: {out}" + (f"; failed: {', '.join(failed)}" if failed else f"; {len(parts)} part(s) ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
