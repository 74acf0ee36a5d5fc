"""The shared shape of every stage's entry point: `python -m <stage> --config X.yaml [--set k=v ...]`.

`stage_parser` is the one place a stage's parser is built, so every command introduces itself as what the user
typed (`usage: python -m finetune distill ...`, not `usage: __main__.py ...`) with the same layout and the same
common flags, spelled and explained the same way everywhere: --config first, then --set, then the stage's own.
A user error (KDError) prints one readable line and exits with status 2, before any work starts
where it can; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, TypeVar

import yaml

from kdlib.config import load_config, yaml_value
from kdlib.errors import KDError

T = TypeVar("T")

CONFIG_HELP = "YAML or JSON config file"
SET_HELP = "override a config field (dotted path), e.g. --set steps=100; repeatable"


def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=3` -> {"a.b": 3}; values are parsed as YAML scalars (numbers, booleans, null, strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KDError(f"--set {pair!r}: expected key=value, e.g. --set steps=100")
        try:
            out[key.strip()] = yaml_value(value)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise KDError(f"--set {pair!r}: the value is not valid YAML ({mark}); quote it, e.g. "
                          f"--set '{key.strip()}=\"{value}\"'") from None
    return out


def summary(doc: str) -> str:
    """A stage's one-line description from its module docstring: the first paragraph on one line, less the
    leading "`python -m ...`: " that would repeat the usage line."""
    first = " ".join((doc or "").strip().split("\n\n")[0].split())
    if first.startswith("`") and "`: " in first:
        first = first.split("`: ", 1)[1]
    return first


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The common flags of a stage that reads a config: `--config CONFIG [--set KEY=VALUE]`."""
    parser.add_argument("--config", required=True, help=CONFIG_HELP)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


class _StepHelp(argparse.Action):
    """-h/--help of a stage with steps: after a step name, that step's own help (`usage: python -m finetune
    distill ...`); otherwise the stage's."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,
                 step_parser: Optional[Callable[[str], argparse.ArgumentParser]] = None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)
        self.step_parser = step_parser

    def __call__(self, parser, namespace, values, option_string=None):
        step = getattr(namespace, "step", None)
        chosen = step is not None and step != parser.get_default("step")
        (self.step_parser(step) if chosen else parser).print_help()
        parser.exit()


def stage_parser(stage: str, doc: str, *, config: bool = True,
                 flags: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 steps: Optional[dict[str, str]] = None, default_step: Optional[str] = None,
                 epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of `python -m <stage>`: prog is what the user typed, the description is `summary(doc)`, then
    --config / --set (when `config`), then the stage's own flags (`flags(parser)`). `steps` ({name: one line})
    adds an optional positional `step` (default `default_step`) whose names and lines the help lists, and makes
    `python -m <stage> <step> --help` print `usage: python -m <stage> <step> ...`."""
    def build(prog: str, description: str, epilog: Optional[str], step_parser=None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                         add_help=step_parser is None,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        if step_parser is not None:
            parser.add_argument("-h", "--help", action=_StepHelp, step_parser=step_parser,
                                help="show this help message and exit")
        if config:
            add_config_flags(parser)
        if flags is not None:
            flags(parser)
        return parser

    prog = f"python -m {stage}"
    if not steps:
        return build(prog, summary(doc), epilog)
    width = max(len(name) for name in steps)
    listing = f"steps (`{prog} STEP --help` for one):\n" + "\n".join(
        f"  {name:<{width}}  {line}" for name, line in steps.items())
    parser = build(prog, summary(doc), listing + (f"\n\n{epilog}" if epilog else ""),
                   step_parser=lambda step: build(f"{prog} {step}", steps[step], None))
    parser.add_argument("step", nargs="?", choices=tuple(steps), default=default_step,
                        help=f"the step to run (default: {default_step})")
    return parser


def exit_code_of(work: Callable[[], object]) -> int:
    """Run `work`: 0 when it finishes, 2 with one readable line when a user error (KDError) stops it."""
    try:
        work()
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def check_flag(parser: argparse.ArgumentParser) -> None:
    """`--check`: validate the config and exit (what `python -m launch slurm` runs before it submits a job)."""
    parser.add_argument("--check", action="store_true", help="validate the config, then exit")


def run_config(args: argparse.Namespace, config_cls: type[T], main: Callable[[T, str], object], *,
               check_only: bool = False) -> int:
    """Load and validate the config that `args` (--config / --set) name, then run `main(config, config_path)` (or,
    with `check_only`, say that it is valid); user errors exit 2."""
    def work():
        cfg = load_config(args.config, config_cls, parse_overrides(args.set))
        if check_only:
            print(f"{args.config}: valid")
        else:
            main(cfg, args.config)
    return exit_code_of(work)


def run_stage(stage: str, doc: str, config_cls: type[T], main: Callable[[T, str], object],
              argv: list[str] | None = None) -> int:
    """`stage_parser(stage, doc)`, then `run_config`: user errors exit 2."""
    return run_config(stage_parser(stage, doc).parse_args(argv), config_cls, main)
