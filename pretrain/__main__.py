"""`python -m pretrain --config X.yaml [--set key=value ...]`: general distillation of a student, under `deepspeed`,
`torchrun` or `srun`.

Parse, validate (before any process group exists), train, exit: 0 done, 2 a user error (config,
fingerprints, checkpoint mismatch), 75 preempted after a checkpoint (requeue to resume).
`--check` validates only; `--export-init DIR` writes the untrained student (a baseline to evaluate).
"""

from __future__ import annotations

import argparse
import os
import sys

from kdlib.config import load_config
from kdlib.errors import KDError
from kdlib.runtime.cli import parse_overrides, stage_parser

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser() -> argparse.ArgumentParser:
    """The stage's parser, apart so that tests walk the same flags a user gives."""
    parser = stage_parser("pretrain", __doc__)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # the deepspeed launcher passes it; we read LOCAL_RANK
    parser.add_argument("--check", action="store_true",
                        help="validate the config (for WORLD_SIZE ranks) and exit: what launchers run before submitting")
    parser.add_argument("--export-init", metavar="DIR", default=None,
                        help="write the untrained student (step 0 of this config) to DIR and exit: a baseline to "
                             "evaluate (DIR: absent, empty, or an earlier --export-init, which is replaced)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # imported after parsing: the config module loads torch, which `--help` must not wait for
    from pretrain.config import PretrainConfig

    try:
        cfg = load_config(args.config, PretrainConfig, parse_overrides(args.set))
        if args.export_init is not None:
            from pretrain.init_export import check_init_folder  # after parsing: --help runs without torch

            check_init_folder(args.export_init, cfg)  # before validation loads anything
        from pretrain.validate import validate  # torch and transformers: after parsing, as the config above

        setup = validate(cfg, args.config)
        if args.check:
            print(f"{args.config}: valid for {setup.place.world_size} rank(s)")
            return 0
        if args.export_init is not None:
            from pretrain.init_export import export_init  # after parsing: --help runs without torch

            print(f"untrained student written to {export_init(cfg, setup, args.export_init)}")
            return 0
        from pretrain.train import train  # after parsing: --help runs without torch

        return train(cfg, setup)
    except KDError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
