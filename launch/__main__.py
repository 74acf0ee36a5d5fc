"""`python -m launch {local,slurm,testcluster} ...`: run a training stage on this machine or as a SLURM job, or start a
multi-host SLURM cluster on this machine to try that on."""

import argparse
import sys

from kdlib.runtime.cli import stage_parser
from launch import local, slurm, testcluster

COMMANDS = {"local": local.main, "slurm": slurm.main, "testcluster": testcluster.main}
COMMAND_HELP = {  # each command's line in `python -m launch --help`; `python -m launch <command> --help` has the rest
    "local": "N ranks on this machine, with meaningful exit statuses",
    "slurm": "a SLURM job: preemption, checkpoint and requeue",
    "testcluster": "a real multi-host SLURM cluster on this machine (network namespaces), up / status / down",
}
EXAMPLE = "e.g. python -m launch local --nproc 2 --config configs/pretrain_demo.yaml"


def parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {COMMAND_HELP[name]}" for name in COMMANDS)
    epilog = f"commands (`python -m launch COMMAND --help` for one):\n{listing}\n\n{EXAMPLE}"
    parser = stage_parser("launch", __doc__, config=False, epilog=epilog)
    parser.add_argument("command", choices=tuple(COMMANDS), help="where the ranks run")
    parser.add_argument("args", nargs="*", default=[], metavar="ARG", help="the command's own arguments")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    try:  # no command, an unknown one, or --help: the parser says what is expected
        args = parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    return COMMANDS[args.command](args.args)


if __name__ == "__main__":
    sys.exit(main())
