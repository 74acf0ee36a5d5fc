"""`python -m finetune [step] --config X.yaml [--set key=value ...] [--fold K] [--seed S] [--arm kd|baseline]`:
task distillation, from a fine-tuned teacher to a small student scored against a no-KD baseline.

With no step, every step runs in order: folds, teacher, transfer, distill, speed, deploy, report. Each step can be
run alone (it finds the earlier steps' files in output_dir); finished work is skipped. Exit status: 0
done, 2 a user error (config, data, fingerprints; named before any training), 75 preempted after a
checkpoint (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

from kdlib.config import load_config
from kdlib.errors import KDError
from kdlib.runtime.cli import parse_overrides, stage_parser
from kdlib.runtime.process_group import dist_env
from finetune.layout import BASELINE, KD

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RANK_STEPS = ("teacher", "distill")  # the steps that train on the training core, so on every rank of a job

STEP_HELP = {  # STEPS + ("all",), each with its line in `--help` (and its `python -m finetune <step> --help`)
    "folds": "stratified k-fold split of the labelled set",
    "teacher": "fine-tune the teacher on each fold's training split",
    "transfer": "each fold's task transfer set (python -m data_pipeline on the training split)",
    "distill": "per seed, the KD student on the transfer set and the no-KD baseline",
    "speed": "time every exported model of a fold on the same held-out batches",
    "deploy": "every KD student exported to ONNX fp32 + int8 and scored on its fold",
    "report": "the comparison of teacher, KD students and baselines",
    "all": "every step above, in order (the default)",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m finetune` and of each `python -m finetune <step>` (after --config / --set)."""
    parser.add_argument("--fold", type=int, action="append", metavar="K", help="only this fold (repeatable)")
    parser.add_argument("--seed", type=int, action="append", metavar="S",
                        help="only this student seed (repeatable; distill)")
    parser.add_argument("--arm", choices=(KD, BASELINE), action="append", help="only this arm (distill)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, the data, the flags and output_dir, then exit")


def build_parser() -> argparse.ArgumentParser:
    """The stage's parser (its steps' parsers are built from the same flags), also for the tests of its flags."""
    return stage_parser("finetune", __doc__, flags=add_flags, steps=STEP_HELP, default_step="all")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line. argparse takes the word after a mistyped flag (`--sett x=1`) for the step and names the
    step; a `--word` that is no flag (nor the start of one) is named first instead."""
    parser = build_parser()
    for word in sys.argv[1:] if argv is None else argv:
        name = word.split("=", 1)[0]
        if name.startswith("--") and not any(flag.startswith(name) for flag in parser._option_string_actions):
            parser.error(f"unrecognized arguments: {word}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        # imported after parsing: these load torch and transformers (~4 s), which `--help` must not wait for
        from finetune.config import FinetuneConfig
        from finetune.driver import run_multitask_steps, run_steps, select
        from finetune.multitask import task_config
        from finetune.steps import check_root
        from finetune.validate import validate

        cfg = load_config(args.config, FinetuneConfig, parse_overrides(args.set))
        if cfg.tasks:  # multi-task: every task checked as its own single-task config
            derived = [task_config(cfg, i) for i in range(len(cfg.tasks))]
            setups = {d.output_dir: validate(d, args.config, field_prefix=f"tasks[{i}].") for i, d in enumerate(derived)}
            summary = "; ".join(f"{t.name}: {s.examples} examples, labels {s.labels}"
                                for t, s in zip(cfg.tasks, setups.values()))
        else:
            setup = validate(cfg, args.config)
            summary = f"{setup.examples} examples, labels {setup.labels}"
        chosen = select(cfg, args.config, args.fold, args.seed, args.arm)
        check_root(cfg)
        world = dist_env().world_size
        if world > 1 and not args.check and args.step not in RANK_STEPS:
            raise KDError(f"{args.step}: runs once, not on {world} ranks; only the steps {', '.join(RANK_STEPS)} train "
                          "on several ranks (`python -m launch local|slurm --stage finetune` runs each step where it "
                          "belongs)")
        if args.check:
            folds = ("the task's train/dev/test split (1 fold)" if cfg.evaluation.mode == "split"
                     else f"{cfg.evaluation.folds} folds")
            print(f"{args.config}: valid ({summary}; {folds} x {len(cfg.evaluation.seeds)} seed(s))")
            return 0
        if cfg.tasks:
            return run_multitask_steps(cfg, setups, args.config, chosen, step=args.step)
        return run_steps(cfg, setup, args.config, chosen, step=args.step)
    except KDError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as stop:  # a run preempted after its checkpoint
        return int(stop.code or 0)


if __name__ == "__main__":
    sys.exit(main())
