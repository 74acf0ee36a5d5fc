"""`python -m launch local --nproc N --config X.yaml`: start a stage's ranks (SLURM: to come, see the README)."""

import sys

from launch import local

COMMANDS = {"local": local.main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m launch {{{','.join(COMMANDS)}}} ...  (e.g. python -m launch local --nproc 2 "
              "--config configs/pretrain_demo.yaml)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
