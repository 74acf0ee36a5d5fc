"""Transfer-set reader start-up and throughput: the base commit against the working tree, in one run.

    python -m bench.reader_startup [--shards 1000 --batches 200 --rounds 3]

Builds (once, under bench/out/) a real transfer set of --shards shards in the pipeline's format:
a tiny BERT teacher (tests/tiny_models.py's WordPiece vocabulary, uint16 ids) over windows of 64-128
tokens of gensim's lee_background corpus, 15% [MASK] positions, the teacher's top-32 logits and
log-sum-exp per position, 16-32 rows per shard, written with kdlib.cache's own writers. Then checks
out the base commit with `git worktree add` into bench/out/ and times, each variant in a fresh
subprocess whose PYTHONPATH is its tree (rounds interleaved, median reported):
  start-up  open the TransferSet as the trainer does (base: verify=True, every shard hashed; new:
            verify="lazy") and produce the first collated batch of 8 rows;
  steady    random-index batches of 8 (decode + collate), rows/s; new lazily hashes each shard the
            first time it reads it, so that cost is counted here; and the same for batches drawn from
            4 shards that stay open (collation alone, no Parquet decode).
Both sides get the same indices; their first and last batches are compared for equality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (imported before the clock starts, as in the trainer)

import kdlib
from kdlib.cache import TransferSet

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "reader_startup"
# the measuring subprocess runs this file with the BASE tree on its path: it must import nothing of bench/
BASE = "9a93e88"
TOP_K, MICRO_BATCH = 32, 8


# ---------------------------------------------------------------- the transfer set


def build(directory: Path, shards: int, seed: int) -> None:
    """A `shards`-shard transfer set with the teacher's real top-k; skipped when it is already there."""
    stamp = f"shards={shards} seed={seed} top_k={TOP_K}"
    if (directory / "manifest.json").is_file() and (directory / "built.txt").is_file() \
            and (directory / "built.txt").read_text() == stamp:
        return
    # here, not at the top: the measuring subprocess runs this file against the base tree, which must import
    # only what `measure` imports (the base's kdlib, no bench/ or tests/)
    from transformers import BertForMaskedLM, BertTokenizerFast

    from kdlib.cache import FORMAT_VERSION, Manifest, row_schema, rows_to_table, shard_name, write_manifest, write_shard
    from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
    from kdlib.text.padding import pad_sequences
    from kdlib.text.readers import gensim_test_data
    from kdlib.schemas import TeacherOutputsConfig
    from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
    from tests.tiny_models import make_tiny_bert

    t0 = time.perf_counter()
    shutil.rmtree(directory, ignore_errors=True)
    teacher = make_tiny_bert(directory.parent / "teacher", layers=2, hidden=32, heads=4, seed=seed, max_positions=128)
    tokenizer = BertTokenizerFast.from_pretrained(str(teacher))
    model = BertForMaskedLM.from_pretrained(str(teacher)).eval()
    text = gensim_test_data("lee_background.cor").read_text(encoding="utf-8")
    stream = np.asarray(tokenizer(text.replace("\n", " "), add_special_tokens=False)["input_ids"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    counts = rng.integers(16, 33, size=shards)
    outputs = TeacherOutputsConfig(top_k=TOP_K)
    vocab = model.config.vocab_size
    schema = row_schema(vocab_size=vocab, top_k=TOP_K, has_mlm=True)
    specials = (tokenizer.cls_token_id, tokenizer.sep_token_id)
    infos, n = [], 0
    for s, count in enumerate(counts):
        rows = []
        for _ in range(count):  # a window of the corpus between [CLS] and [SEP], 15% of its inner tokens masked
            length = int(rng.integers(64, 129))
            start = int(rng.integers(0, len(stream) - length))
            ids = np.concatenate([[specials[0]], stream[start:start + length - 2], [specials[1]]])
            positions = np.sort(rng.choice(np.arange(1, length - 1), size=round(0.15 * (length - 2)), replace=False))
            labels = ids[positions].copy()
            ids[positions] = tokenizer.mask_token_id
            rows.append({"id": f"row-{n:08d}", "source_id": f"lee@{start}", "augmentation": "original",
                         "input_ids": ids.astype(np.int32), "mlm_positions": positions.astype(np.int32),
                         "mlm_labels": labels.astype(np.int32)})
            n += 1
        ids, mask = pad_sequences([r["input_ids"] for r in rows], tokenizer.pad_token_id or 0)
        for row, values in zip(rows, rows_from_outputs(teacher_forward(model, ids, mask, outputs), ids, mask, outputs,
                                                       vocab)):
            row.update(values)
        infos.append(write_shard(directory, shard_name(s, shards), rows_to_table(rows, schema)))
    write_manifest(directory, Manifest(
        format_version=FORMAT_VERSION,
        teacher={"ref": str(teacher), "fingerprint": model_fingerprint(teacher), "task": "masked_lm",
                 "vocab_size": vocab, "num_layers": 2, "hidden_size": 32},
        tokenizer_fingerprint=tokenizer_fingerprint(teacher), config={"bench": stamp}, config_hash="bench",
        cached={"top_k": TOP_K, "dense_logits": False, "hidden_layers": [], "pooled": None, "labels": False,
                "mlm": True},
        dtypes={c: str(schema.field(c).type) for c in ("topk_ids", "topk_logits", "lse")}, max_length=128,
        shards=infos, totals={"rows": n, "tokens": sum(i.tokens for i in infos), "bytes": sum(i.bytes for i in infos)},
        fidelity={}, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    (directory / "built.txt").write_text(stamp)
    print(f"built {shards} shards, {n} rows in {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------- one measurement (runs in a subprocess)


def measure(transfer: str, verify: str, path: str, batches: int, seed: int, save: str) -> dict:
    """Start-up (open + first batch) and steady-state rows/s with whatever kdlib PYTHONPATH points at."""
    manifest = json.loads((Path(transfer) / "manifest.json").read_text())
    rows = manifest["totals"]["rows"]
    rng = np.random.default_rng(seed)
    first = rng.permutation(rows)[:MICRO_BATCH].tolist()  # the sampler's first micro-batch
    plan = [rng.integers(0, rows, size=MICRO_BATCH).tolist() for _ in range(batches)]
    hot_rows = sum(s["rows"] for s in manifest["shards"][:4])  # 4 shards: all stay open (max_open_shards=4)
    hot = [rng.integers(0, hot_rows, size=MICRO_BATCH).tolist() for _ in range(batches)]
    mode = {"eager": True, "off": False}.get(verify, verify)  # the base accepts only booleans
    t0 = time.perf_counter()
    ts = TransferSet(transfer, teacher_fingerprint=manifest["teacher"]["fingerprint"],
                     tokenizer_fingerprint=manifest["tokenizer_fingerprint"], verify=mode)
    load = (lambda idx: ts.batch(idx, pad_id=0)) if path == "batch" else (lambda idx: ts.collate(ts.rows(idx), pad_id=0))
    opened = time.perf_counter()
    head = load(first)
    startup = time.perf_counter()
    for indices in plan:
        tail = load(indices)
    steady = time.perf_counter() - startup
    load(list(range(hot_rows)))  # decode the 4 shards, then time collation alone
    t1 = time.perf_counter()
    for indices in hot:
        load(indices)
    collate_only = time.perf_counter() - t1
    arrays = {}
    for name, batch in (("first", head), ("last", tail)):
        for key, value in batch.items():
            arrays[f"{name}/{key}"] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    np.savez(save, **arrays)
    return {"kdlib": kdlib.__file__, "open_s": opened - t0, "startup_s": startup - t0,
            "rows_per_s": batches * MICRO_BATCH / steady, "hot_rows_per_s": batches * MICRO_BATCH / collate_only}


# ---------------------------------------------------------------- driver


def run_variant(tree: Path, transfer: Path, verify: str, path: str, args, tag: str) -> dict:
    from bench.base_tree import check_imported  # not at the top: the measuring subprocess (the base tree) has no bench/

    save = OUT / f"{tag}.npz"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--transfer", str(transfer), "--verify", verify,
           "--path", path, "--batches", str(args.batches), "--seed", str(args.seed), "--save", str(save)]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")  # one thread per rank, as the trainer runs here
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    check_imported(result["kdlib"], tree, tag)
    return dict(result, save=save)


def same_batches(a: Path, b: Path) -> bool:
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        return list(x.keys()) == list(y.keys()) and all(
            x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x.keys())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reader_startup", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-worktree", action="store_true", help="leave bench/out/base-* checked out")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transfer", help=argparse.SUPPRESS)
    parser.add_argument("--verify", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.transfer, args.verify, args.path, args.batches, args.seed, args.save)))
        return

    from bench.base_tree import remove, worktree  # not at the top: see run_variant

    transfer = OUT / "transfer"
    build(transfer, args.shards, args.seed)
    manifest = json.loads((transfer / "manifest.json").read_text())
    base = worktree(BASE)
    variants = {"base (verify=True, collate(rows))": (base, "eager", "rows"),
                "new (verify=\"lazy\", batch)": (REPO, "lazy", "batch"),
                "new (verify=\"lazy\", collate(rows))": (REPO, "lazy", "rows")}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds):
            for i, (name, (tree, verify, path)) in enumerate(variants.items()):
                runs[name].append(run_variant(tree, transfer, verify, path, args, f"v{i}-r{r}"))
    finally:
        if not args.keep_worktree:
            remove(base)
    med = {name: {k: statistics.median(run[k] for run in rs) for k in ("open_s", "startup_s", "rows_per_s", "hot_rows_per_s")}
           for name, rs in runs.items()}
    identical = all(same_batches(runs[list(variants)[0]][0]["save"], rs[0]["save"]) for rs in runs.values())
    size = manifest["totals"]["bytes"] / 2**20
    print(f"\n{len(manifest['shards'])} shards, {manifest['totals']['rows']:,} rows, {size:,.1f} MiB; "
          f"batches of {MICRO_BATCH}; {args.batches} steady batches; median of {args.rounds} rounds")
    print(f"{'variant':40s} {'open s':>8s} {'start-up s':>11s} {'rows/s':>9s} {'rows/s, shards open':>20s}")
    for name, m in med.items():
        print(f"{name:40s} {m['open_s']:8.4f} {m['startup_s']:11.4f} {m['rows_per_s']:9,.0f} "
              f"{m['hot_rows_per_s']:20,.0f}")
    b, n = med[list(variants)[0]], med[list(variants)[1]]
    print(f"start-up  base / new = {b['startup_s'] / n['startup_s']:.1f}x faster")
    print(f"rows/s    new / base = {n['rows_per_s'] / b['rows_per_s']:.2f}x; with the shards already open "
          f"{n['hot_rows_per_s'] / b['hot_rows_per_s']:.2f}x")
    print(f"first and last batches identical across variants: {identical}")
    print("all rounds (start-up s, rows/s): " + "; ".join(
        f"{name.split(' ')[0]}{' batch' if 'batch' in name else ''}: "
        + ", ".join(f"{x['startup_s']:.4f}/{x['rows_per_s']:,.0f}" for x in rs) for name, rs in runs.items()))


if __name__ == "__main__":
    main()
