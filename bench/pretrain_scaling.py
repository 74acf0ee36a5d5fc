"""General distillation with 2 processes against 1 on this machine, same config, one run.

    python -m bench.pretrain_scaling [--config configs/pretrain_demo.yaml] [--steps 12]

Runs `torchrun -m pretrain` with 1 process x 2 threads and with 2 processes x 1 thread (the
machine's 2 cores either way) into bench/out/, and compares the median tokens/s of the steps after
the first two (start-up and allocator warm-up excluded). Needs the demo's teacher and transfer set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, processes: int, threads: int, steps: int) -> float:
    out = ROOT / "bench" / "out" / f"pretrain_{processes}proc"
    if out.exists():
        shutil.rmtree(out)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", str(processes), "-m", "pretrain", "--config", config,
           "--set", f"output_dir={out}", "--set", f"steps={steps}", "--set", f"threads={threads}",
           "--set", "eval_every=0", "--set", f"checkpoint_every={steps}", "--set", "progress_bar=false"]
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train"][2:]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain_demo.yaml")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    one = run(args.config, 1, 2, args.steps)
    two = run(args.config, 2, 1, args.steps)
    print(f"\n1 process x 2 threads : {one:8,.0f} tokens/s (median over steps 3..{args.steps})")
    print(f"2 processes x 1 thread: {two:8,.0f} tokens/s (global)")
    print(f"ratio 2 processes / 1 : {two / one:.2f}")


if __name__ == "__main__":
    main()
