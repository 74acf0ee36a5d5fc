"""`python -m teacher.decoder --config configs/decoder/teacher.yaml`: train a decoder teacher (and student
tokenizers) from scratch on a local corpus."""

import argparse
import sys

from kdlib.runtime.cli import check_flag, run_config, stage_parser


def parser() -> argparse.ArgumentParser:
    """The stage's parser, apart so that tests walk the same flags a user gives."""
    return stage_parser("teacher.decoder", __doc__, flags=check_flag)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # imported after parsing: preparing a decoder teacher loads torch, which `--help` must not wait for
    from teacher.prepare_decoder import DecoderPrepConfig, prepare_decoder

    return run_config(args, DecoderPrepConfig, prepare_decoder, check_only=args.check)


if __name__ == "__main__":
    sys.exit(main())
