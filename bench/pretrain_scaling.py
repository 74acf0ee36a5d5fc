"""General distillation with 2 processes against 1 on this machine, same config, one run.

    python -m bench.pretrain_scaling [--config configs/pretrain_demo.yaml] [--steps 12]

Runs `torchrun -m pretrain` with 1 process x 2 threads and with 2 processes x 1 thread (the
machine's 2 cores either way) into bench/out/, and compares the median tokens/s of the steps after
the first two (start-up and allocator warm-up excluded). Needs the demo's teacher and transfer set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.base_tree import run_in
from kdlib.runtime.jsonl import json_objects

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, processes: int, threads: int, steps: int, *, tree: Path = ROOT, tag: str = "",
        sets: tuple[str, ...] = ()) -> dict:
    """One `torchrun -m pretrain` into bench/out/: median tokens/s of steps 3.., wall seconds, first and last
    loss, final held-out top-1 agreement.

    The command runs inside `tree` with PYTHONPATH=tree: `-m` puts the working directory first on
    sys.path, so it trains with that tree's code (the base-vs-new benchmarks rely on this).
    """
    out = ROOT / "bench" / "out" / f"pretrain_{tag or f'{processes}proc'}"
    if out.exists():
        shutil.rmtree(out)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", str(processes), "-m", "pretrain", "--config", str(ROOT / config),
           "--set", f"output_dir={out}", "--set", f"steps={steps}", "--set", f"threads={threads}",
           "--set", "eval_every=0", "--set", f"checkpoint_every={steps}", "--set", "progress_bar=false"]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    run_in(tree, cmd, dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - started
    records = [record for _, record in json_objects(out / "metrics.jsonl")]
    train = [r for r in records if r.get("kind") == "train"]
    final_eval = [r for r in records if r.get("kind") == "eval"][-1]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[2:]), "wall_s": wall,
            "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
            "top1_agreement": final_eval.get("top1_agreement")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain_demo.yaml")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    demo = ROOT / "runs" / "demo"  # absolute: the command runs from the tree's root
    sets = (f"teacher.path={demo / 'teacher_mlm'}", f"transfer_set={demo / 'transfer_set'}")
    one = run(args.config, 1, 2, args.steps, sets=sets)["tokens_per_s"]
    two = run(args.config, 2, 1, args.steps, sets=sets)["tokens_per_s"]
    print(f"\n1 process x 2 threads : {one:8,.0f} tokens/s (median over steps 3..{args.steps})")
    print(f"2 processes x 1 thread: {two:8,.0f} tokens/s (global)")
    print(f"ratio 2 processes / 1 : {two / one:.2f}")


if __name__ == "__main__":
    main()
