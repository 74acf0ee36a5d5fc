"""`python -m report.steps --file steps.json --name NAME -- command ...`: run one demo step and record how long it took.

The demo script wraps each of its steps in this, so the report can show the time every step took on this machine.
A rerun of the demo skips finished work inside each stage, so a step's latest time can be seconds where the first
took minutes: each record keeps both (`seconds`, the latest run, and `work_seconds`, the longest run since the
step's command last changed). The child's exit status is passed through; a failed step is recorded as failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from kdlib.errors import ReaderError
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.jsonl import json_document


def read_steps(path: str | Path) -> dict:
    """The step records in run order ({} when the file does not exist yet)."""
    path = Path(path)
    return json_document(path) if path.is_file() else {}


def record_step(path: str | Path, name: str, command: list[str], seconds: float, returncode: int, started: str) -> dict:
    """Merge one run of step `name` into the file (atomically) and return its record."""
    steps = read_steps(path)
    previous = steps.get(name, {})
    same_command = previous.get("command") == command
    done = returncode == 0
    work = max(seconds, previous.get("work_seconds", 0.0)) if same_command and done else seconds
    steps[name] = {"command": command, "seconds": round(seconds, 2), "work_seconds": round(work, 2),
                   "started": started, "returncode": returncode,
                   "runs": previous.get("runs", 0) + 1 if same_command else 1}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(steps, indent=2) + "\n")
    return steps[name]


def _seconds(text: str) -> float:
    value = float(text)  # a ValueError is argparse's "invalid _seconds value"
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("report.steps", __doc__, config=False)
    parser.add_argument("--file", required=True, help="the steps file (JSON), created when missing")
    parser.add_argument("--name", required=True, help="the step's name in the report")
    parser.add_argument("--seconds", type=_seconds, help="record this time for a step run elsewhere (no command)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("file", "name"):  # a name is a row of report.md's tables, the file a path: one line each
        if not getattr(args, flag).isprintable():
            parser.error(f"argument --{flag}: expected one line of text, got {getattr(args, flag)!r}")
    try:  # before the command runs: a steps file it could not update must not cost the step's run
        if Path(args.file).exists() and not Path(args.file).is_file():
            raise ReaderError(f"{args.file}: not a file")
        read_steps(args.file)
    except ReaderError as err:
        parser.error(f"argument --file: {err}")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    if args.seconds is not None:  # a step timed by the caller (setup runs before this interpreter exists)
        record_step(args.file, args.name, command or [args.name], args.seconds, 0, started)
        return 0
    if not command:
        parser.error("no command given after --")
    t0 = time.monotonic()
    returncode = subprocess.call(command)
    record_step(args.file, args.name, command, time.monotonic() - t0, returncode, started)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
