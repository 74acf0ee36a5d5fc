"""`python -m launch {local,slurm} ...`: start a stage's ranks on this machine, or as a SLURM job."""

import sys

from launch import local, slurm

COMMANDS = {"local": local.main, "slurm": slurm.main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m launch {{{','.join(COMMANDS)}}} ...  (e.g. python -m launch local --nproc 2 "
              "--config configs/pretrain_demo.yaml)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
