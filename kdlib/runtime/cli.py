"""The shared shape of every stage's entry point: `python -m <stage> --config X.yaml [--set k=v ...]`.

A user error (KDError) prints one readable line and exits with status 2, before any work starts
where it can; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TypeVar

import yaml

from kdlib.config import load_config
from kdlib.errors import KDError

T = TypeVar("T")


def parse_overrides(pairs: list[str]) -> dict:
    """`a.b=3` -> {"a.b": 3}; values are parsed as YAML scalars (numbers, booleans, null, strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise KDError(f"--set {pair!r}: expected key=value, e.g. --set steps=100")
        out[key.strip()] = yaml.safe_load(value)
    return out


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML or JSON config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted path), e.g. --set steps=100; repeatable")
    return parser


def exit_code_of(work: Callable[[], object]) -> int:
    """Run `work`: 0 when it finishes, 2 with one readable line when a user error (KDError) stops it."""
    try:
        work()
    except KDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_stage(description: str, config_cls: type[T], main: Callable[[T, str], object],
              argv: list[str] | None = None) -> int:
    """Parse, load and validate the config, then run `main(config, config_path)`; user errors exit 2."""
    args = config_parser(description).parse_args(argv)
    return exit_code_of(lambda: main(load_config(args.config, config_cls, parse_overrides(args.set)), args.config))
