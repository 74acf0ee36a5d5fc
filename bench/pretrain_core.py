"""General distillation on the demo before and after the shared training core, in one run.

    python -m bench.pretrain_core [--config configs/pretrain_demo.yaml] [--steps 16] [--rounds 2] [--base 9a93e88]
        [--documents 40]

Runs `torchrun --nproc_per_node 2 -m pretrain` (2 gloo processes x 1 thread, the demo's launch) from
the base commit (checked out with `git worktree` under bench/out/, imported through PYTHONPATH) and
from the working tree, on the same teacher, transfer set and config, rounds interleaved. Reports per
variant the median tokens/s of the steps after the first two and the wall seconds of the whole command
(start-up, the step-0 and final evaluations, checkpoint and export included), medians over rounds,
and the first and last losses and final held-out top-1 agreement of the first round (the two
should train the same model). Needs the demo's teacher (`make demo`, step 2).

Both variants read what the base can read: the base commit's copy of the config (a newer one may name
objectives the base lacks) and a transfer set its own pipeline writes under bench/out/ once (its
configs/demo_pipeline.yaml on the first --documents articles; the base's reader predates the cached
hidden states and pooled embeddings).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.base_tree import OUT, REPO, remove, run_in, worktree
from bench.local_runs import env
from bench.pretrain_scaling import run


def base_transfer_set(base: Path, teacher: Path, documents: int) -> Path:
    """The transfer set of the base's pipeline on the first `documents` articles (skipped when complete)."""
    out = OUT / f"pretrain_core_transfer_set_{documents}"
    cmd = [sys.executable, "-m", "data_pipeline", "--config", str(base / "configs" / "demo_pipeline.yaml"),
           "--set", f"output_dir={out}", "--set", f"teacher.path={teacher}",
           "--set", f"corpus.max_documents={documents}"]
    run_in(base, cmd, env())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain_core", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain_demo.yaml")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", default="9a93e88", help="the commit before the training core")
    parser.add_argument("--documents", type=int, default=40, help="articles in the transfer set (the demo's 40)")
    args = parser.parse_args()
    demo = REPO / "runs" / "demo"  # absolute: each command runs from its own tree's root
    base = worktree(args.base)
    config = str(base / args.config)
    trees = {f"base {args.base}": base, "training core (working tree)": REPO}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        data = base_transfer_set(base, demo / "teacher_mlm", args.documents)
        sets = (f"teacher.path={demo / 'teacher_mlm'}", f"transfer_set={data}")
        for r in range(args.rounds):
            for i, (name, tree) in enumerate(trees.items()):
                runs[name].append(run(config, 2, 1, args.steps, tree=tree, tag=f"core_v{i}_r{r}", sets=sets))
    finally:
        remove(base)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "wall_s")} for name, rs in runs.items()}
    first = [rs[0]["first_loss"] for rs in runs.values()]
    last = [rs[0]["last_loss"] for rs in runs.values()]
    agree = [rs[0]["top1_agreement"] for rs in runs.values()]
    print(f"\n{args.config} as of {args.base}, {args.steps} steps, 2 processes x 1 thread, median of {args.rounds} rounds")
    for name, m in med.items():
        print(f"{name:32s} {m['tokens_per_s']:8,.0f} tokens/s   {m['wall_s']:6.1f} s wall")
    (b, n) = med.values()
    print(f"tokens/s new / base = {n['tokens_per_s'] / b['tokens_per_s']:.3f}; wall base / new = "
          f"{b['wall_s'] / n['wall_s']:.3f}")
    print(f"first-step loss base {first[0]:.6f}, new {first[1]:.6f}: same = {abs(first[0] - first[1]) < 1e-5}")
    print(f"last-step loss base {last[0]:.6f}, new {last[1]:.6f}; held-out top-1 agreement base {agree[0]:.4f}, "
          f"new {agree[1]:.4f}")
    print("all rounds (tokens/s, wall s): " + "; ".join(
        f"{name}: " + ", ".join(f"{x['tokens_per_s']:,.0f}/{x['wall_s']:.1f}" for x in rs) for name, rs in runs.items()))


if __name__ == "__main__":
    main()
