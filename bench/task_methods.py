"""Every task-distillation method of configs/task_methods/ on one budget, side by side in one table.

    python -m bench.task_methods [--methods soft_kd,pkd,...] [--labelled N] [--unlabeled N] [--steps N]
        [--seeds 0,1,2] [--set KEY=VALUE ...] [--out runs/bench/task_methods] [--no-share-teacher] [--table-only]

Each config runs through `python -m finetune` one step at a time (folds, teacher, transfer, distill --arm kd,
distill --arm baseline, speed, report), each step its own process with its log in OUT/logs/, into OUT/<method>;
the stage skips what is finished, so a rerun trains only what is missing and prints the table again. The budget
flags become the stage's --set overrides: --labelled -> evaluation.labelled, --unlabeled -> transfer.unlabeled
(both mode split only: bam.yaml, multi-task, cannot take them), --steps -> distill.steps (TinyBERT's phases and
Theseus' replacement phase are scaled with it, keeping their share of the run), --seeds -> evaluation.seeds; --set
items follow them unchanged, for every config. A run made with other overrides hashes differently and is refused by
the stage: give each budget its own --out. Every config is checked (`python -m finetune --check`) before anything
trains. The table (bench.task_methods_table) reads every number from the methods' report.json; it is printed and
written to OUT/table.md and OUT/table.json with the command, the date and the machine.

What is and is not reused between methods. The finetune stage reuses nothing across output folders by itself: each
config fine-tunes its own teacher and builds its own transfer set. A teacher can be handed over (teacher.finetuned),
so by default the first config in the table's order whose fold has one fine-tuned teacher in mode split (soft_kd)
trains it, also when only later configs are run, and every other config with the same task, budget, teacher settings
and first seed takes that folder (--no-share-teacher: each trains its own; multi_teacher and bam always do). The
transfer set cannot be shared: the stage writes its data_pipeline config without the pipeline's content-addressed
store (cache_root), and the sets differ anyway in what they cache (PKD, FSP, NST: hidden states; RKD: pooled
embeddings), so every method runs the teacher over its 27,000 rows (1,000 labelled + 8,000 unlabeled tweets, 2
augmented copies each, ~28 tokens a row) again, multi_teacher 3 times, bam per task and fold. Measured on 2 cores
with other jobs running (load 5-9), at the smoke size (60 labelled + 60 unlabeled tweets, 8 teacher steps): the
teacher step took 161 s where it fine-tunes and 11 s where it takes the shared teacher; a 360-row transfer set 35-42
s, of which the teacher ran at 600-2,900 tokens/s per shard, so a full set, ~770k tokens, takes 2-20 minutes per
method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from bench.local_runs import REPO, run_logged
from bench.task_methods_table import method_rows, report_of, write_table
from finetune.__main__ import main as finetune_main
from finetune.config import FinetuneConfig
from finetune.runs import teacher_folder, teacher_seeds
from kdlib.config import load_config, to_dict
from kdlib.errors import KDError
from kdlib.runtime.cli import parse_overrides

CONFIGS = REPO / "configs" / "task_methods"
ORDER = ("soft_kd", "logit_mse", "prob_shift", "dynamic_temperature", "temperature_schedule", "weight_schedule",
         "pkd", "tinybert", "theseus", "dml", "rkd", "fsp", "nst", "multi_teacher", "bam")  # the table's order
STEPS = (("folds", ()), ("teacher", ()), ("transfer", ()), ("distill-kd", ("--arm", "kd")),
         ("distill-baseline", ("--arm", "baseline")), ("speed", ()), ("report", ()))


def known_methods() -> list[str]:
    """The configs of configs/task_methods/, in the table's order (any others after, by name)."""
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def scaled(steps: list[int], total: int) -> list[int]:
    """`steps` rescaled to sum to `total`, each at least 1 (the last takes the rounding)."""
    if total < len(steps):
        raise SystemExit(f"--steps {total}: expected at least {len(steps)} (one per phase)")
    out = [max(1, round(s * total / sum(steps))) for s in steps[:-1]]
    return out + [total - sum(out)]


def budget_overrides(base: FinetuneConfig, args) -> list[str]:
    """The --set items of the command line's budget for one config as shipped (`base`)."""
    sets, d = [], base.distill
    if not base.tasks:
        sets += [f"evaluation.labelled={args.labelled}"] if args.labelled is not None else []
        sets += [f"transfer.unlabeled={args.unlabeled}"] if args.unlabeled is not None else []
    if args.steps is not None:
        if d.phases:
            steps = scaled([p.steps for p in d.phases], args.steps)
            sets.append("distill.phases=" + json.dumps([dict(to_dict(p), steps=n) for p, n in zip(d.phases, steps)]))
        else:
            sets.append(f"distill.steps={args.steps}")
        sets.append(f"distill.eval_every={min(d.eval_every, args.steps)}")
        if d.method == "theseus" and d.theseus.replacement_steps:
            replacing = max(1, round(d.theseus.replacement_steps * args.steps / d.steps))
            sets.append(f"distill.theseus.replacement_steps={replacing}")
    if args.seeds is not None:
        sets.append(f"evaluation.seeds={json.dumps(args.seeds)}")
    return sets


def teacher_key(cfg: FinetuneConfig) -> Optional[str]:
    """What a split-mode fold's single teacher depends on; None when the config cannot take a given teacher (several
    teachers or tasks, one already given, or several folds: teacher.finetuned serves every fold)."""
    e = cfg.evaluation
    if cfg.tasks or len(cfg.teacher.seeds) > 1 or cfg.teacher.finetuned is not None or e.mode != "split":
        return None
    return json.dumps({"task": to_dict(cfg.task), "labels": cfg.labels, "task_type": cfg.task_type,
                       "max_length": cfg.max_length, "teacher": to_dict(cfg.teacher),
                       "fold": [e.split_seed, e.labelled, e.max_valid, teacher_seeds(cfg)]}, sort_keys=True)


class Method:
    """One config of configs/task_methods/ with its overrides and resolved config."""

    def __init__(self, name: str, args, out: Path):
        self.name, self.path = name, CONFIGS / f"{name}.yaml"
        self.sets = budget_overrides(load_config(self.path, FinetuneConfig), args) + list(args.set) + [
            f"output_dir={out / name}"]
        self.cfg = load_config(self.path, FinetuneConfig, parse_overrides(self.sets))
        self.donor: Optional[Method] = None  # the method whose fine-tuned teacher this one takes

    def command(self, step: str, extra: tuple = ()) -> list[str]:
        share = [] if self.donor is None else ["teacher.init=null",
                                               f"teacher.finetuned={teacher_folder(self.donor.cfg, 0)}"]
        sets = [x for s in self.sets + share for x in ("--set", s)]
        return ["-m", "finetune", step, "--config", str(self.path.relative_to(REPO)), *sets, *extra]


def share_teachers(methods: list[Method]) -> None:
    """Every method whose teacher equals an earlier method's takes that teacher's folder (teacher.finetuned). Over
    every config, not only those run, so a method's donor (and so its runs' hashes) does not depend on --methods."""
    donors: dict[str, Method] = {}
    for m in methods:
        key = teacher_key(m.cfg)
        if key is not None:
            m.donor = donors.get(key)
            donors.setdefault(key, m)


def run_steps(m: Method, logs: Path, steps=STEPS) -> dict[str, float]:
    """Finetune steps of one method, each timed; {step: wall seconds}."""
    seconds = {}
    for step, extra in steps:
        args = m.command(step.split("-")[0], extra)
        print(f"[bench.task_methods] {m.name} {step}: python {shlex.join(args)}", flush=True)
        seconds[step] = run_logged(args, logs / f"{m.name}.{step}.log", f"{m.name} {step}")
        print(f"[bench.task_methods] {m.name} {step}: {seconds[step]:.0f} s", flush=True)
    return seconds


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.task_methods", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="", help="comma-separated config names (default: all)")
    parser.add_argument("--labelled", type=int, help="evaluation.labelled: the labelled budget")
    parser.add_argument("--unlabeled", type=int, help="transfer.unlabeled: unlabeled texts in the transfer set")
    parser.add_argument("--steps", type=int, help="distill.steps (phases and Theseus' replacement scaled)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="evaluation.seeds, e.g. 0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any finetune override")
    parser.add_argument("--out", default="runs/bench/task_methods", help="the output root (a folder per method)")
    parser.add_argument("--no-share-teacher", action="store_true", help="every config fine-tunes its own teacher")
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the finished runs")
    args = parser.parse_args(argv)
    known = known_methods()
    args.methods = [m for m in args.methods.split(",") if m] or known
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    out = (REPO / args.out).resolve()
    header = {"command": "python -m bench.task_methods " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                         f"os.cpu_count() = {os.cpu_count()}, Python {platform.python_version()}"}
    if not args.table_only:  # the table repeats these lines
        print("\n".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    every = []
    for name in known_methods():  # all of them: a method's teacher donor must not depend on --methods
        try:
            every.append(Method(name, args, out))
        except KDError as err:  # an override that does not fit a config nobody asked for leaves it out
            if name in args.methods:
                print(f"error: {err}", file=sys.stderr)
                return 2
    if not args.no_share_teacher:
        share_teachers(every)
    methods = [m for m in every if m.name in args.methods]
    wall: dict[str, dict[str, float]] = {}
    if not args.table_only:
        for m in methods:  # every config checked before anything trains (a shared teacher does not exist yet)
            if finetune_main(["--check", "--config", str(m.path), *[x for s in m.sets for x in ("--set", s)]]) != 0:
                return 2
        for donor in dict.fromkeys(m.donor for m in methods if m.donor is not None and m.donor not in methods):
            wall[donor.name] = run_steps(donor, out / "logs", STEPS[:2])  # its teacher only: the others take it
        for m in methods:
            wall[m.name] = run_steps(m, out / "logs")
    done = [m for m in methods if report_of(m.cfg)[0].is_file()]
    for m in methods:
        if m not in done:
            print(f"[bench.task_methods] {m.name}: no report yet ({report_of(m.cfg)[0]})", flush=True)
    rows = [row for i, m in enumerate(done) for row in method_rows(m.name, m.cfg, reference=i == 0)]
    shared = [f"{m.name} <- {m.donor.name}" for m in methods if m.donor is not None]
    header["shared teacher"] = "; ".join(shared) + " (teacher.finetuned)" if shared else "none (each its own)"
    print(write_table(out, rows, header, {"wall_seconds": wall} if wall else {}), flush=True)
    if wall:
        print("wall seconds per finetune step (this command): " + json.dumps(wall), flush=True)
    print(f"[bench.task_methods] {out / 'table.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
