"""`python -m teacher --config configs/demo_teacher.yaml`: train a masked-LM head over a frozen encoder."""

import argparse
import sys

from kdlib.runtime.cli import check_flag, run_config, stage_parser


def parser() -> argparse.ArgumentParser:
    """The stage's parser, apart so that tests walk the same flags a user gives."""
    return stage_parser("teacher", __doc__, flags=check_flag)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # imported after parsing: preparing a teacher loads torch, which `--help` must not wait for
    from teacher.prepare_mlm import TeacherPrepConfig, prepare_teacher

    return run_config(args, TeacherPrepConfig, prepare_teacher, check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
