"""Every number the report shows comes with the file and key it was read from, so it can be checked later.

`Numbers.show(file, key..., fmt=...)` reads a value from a JSON metrics file (or a YAML config), formats it and
records (shown text, file, key, format, scale) in numbers.json beside report.md. `verify(report_dir)` reads both
back: each recorded value must still format to what was shown, and the numbers in report.md (outside code spans,
which hold commands and paths) must be exactly the recorded ones, no more and no fewer.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdlib.config import read_config_file
from kdlib.errors import ReaderError
from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.jsonl import json_document

NUMBERS_FILE = "numbers.json"
NUMBER = re.compile(r"(?<![\w.\-/])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


@dataclass
class Shown:
    """One number of the report: shown = format(scale x sum(coefficient x file[key...]), fmt).

    Most numbers are one term with coefficient 1; a difference (int8 vs fp32 accuracy) or a total (the demo's
    minutes) is a short sum, so even those are checked against the files rather than trusted.
    """

    shown: str
    terms: list  # [file, key (a list of str / int), coefficient]
    fmt: str
    scale: float = 1.0


def _load(file: str) -> Any:
    path = Path(file)
    try:
        if path.suffix in (".yaml", ".yml"):
            return read_config_file(path)
        return json_document(path, expect=None)
    except FileNotFoundError:
        raise ReaderError(f"{file}: missing; the report reads its numbers from it") from None


def lookup(data: Any, key: list, file: str = "<data>") -> Any:
    """data[key[0]][key[1]]...; a missing key is named with its file."""
    for i, part in enumerate(key):
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            raise ReaderError(f"{file}: has no {'.'.join(map(str, key[:i + 1]))}") from None
    return data


def _numeric(value: Any) -> bool:
    return value is not None and not isinstance(value, bool) and isinstance(value, (int, float))


def render(values: list, coefficients: list, fmt: str, scale: float = 1.0) -> str:
    """format(scale x sum(c x v), fmt); a null or non-finite value reads n/a; integer formats round first."""
    if not all(_numeric(v) for v in values):
        return "n/a"
    x = scale * sum(c * v for c, v in zip(coefficients, values))
    if not math.isfinite(x):
        return "n/a"
    return format(round(x), fmt) if fmt.endswith("d") else format(x, fmt)


def numbers_in(text: str) -> list[str]:
    """The numeric tokens of Markdown text outside code, each stripped of a trailing comma."""
    return [t.rstrip(",") for t in NUMBER.findall(CODE.sub(" ", text))]


class Numbers:
    """The registry one report is built with; files are read once each."""

    def __init__(self) -> None:
        self.entries: list[Shown] = []
        self._files: dict[str, Any] = {}

    def value(self, file: str, *key) -> Any:
        """A raw value, for decisions (met / missed) and plots; what is shown goes through `show`."""
        if file not in self._files:
            self._files[file] = _load(file)
        return lookup(self._files[file], list(key), file)

    def show(self, file: str, *key, fmt: str = ".4f", scale: float = 1.0) -> str:
        """The text of file[key...] (x scale) in `fmt`, recorded."""
        return self.show_sum([(file, list(key), 1.0)], fmt=fmt, scale=scale)

    def show_sum(self, terms: list, *, fmt: str = ".4f", scale: float = 1.0) -> str:
        """The text of scale x sum(coefficient x file[key...]) over terms [(file, key, coefficient)], recorded."""
        terms = [[str(f), list(k), float(c)] for f, k, c in terms]
        text = render([self.value(f, *k) for f, k, _ in terms], [c for _, _, c in terms], fmt, scale)
        self.entries.append(Shown(text, terms, fmt, scale))
        return text

    def save(self, report_dir: Path) -> Path:
        path = Path(report_dir) / NUMBERS_FILE
        atomic_write_text(path, json.dumps([asdict(e) for e in self.entries], indent=1, ensure_ascii=False) + "\n")
        return path


def verify(report_dir: str | Path) -> list[str]:
    """What is wrong with report.md against its sources (empty: every number equals its source's)."""
    report_dir = Path(report_dir)
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    entries = [Shown(**e) for e in json_document(report_dir / NUMBERS_FILE, expect=list)]
    problems, sources = [], Numbers()  # its value() reads each file once
    for e in entries:
        try:
            values = [sources.value(file, *key) for file, key, _ in e.terms]
            again = render(values, [c for _, _, c in e.terms], e.fmt, e.scale)
        except ReaderError as error:
            problems.append(str(error))
            continue
        if again != e.shown:
            where = " + ".join(f"{c:g} x {f} {'.'.join(map(str, k))}" for f, k, c in e.terms)
            problems.append(f"{where}: the report shows {e.shown}, the files give {again}")
    expected = Counter(t for e in entries for t in numbers_in(e.shown))
    found = Counter(numbers_in(text))
    for token, count in (found - expected).items():
        problems.append(f"report.md shows {token} {count} time(s) more than any source gives it")
    for token, count in (expected - found).items():
        problems.append(f"report.md lacks {token} ({count} recorded time(s))")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`python -m report.numbers REPORT_DIR`: check report.md against its sources; exit 1 listing what differs."""
    parser = stage_parser("report.numbers", "check a report's numbers against the files they were read from",
                          config=False, flags=lambda p: p.add_argument("report_dir", metavar="REPORT_DIR",
                                                                       help="the folder holding report.md and numbers.json"))
    report_dir = parser.parse_args(argv).report_dir
    problems = verify(report_dir)
    for problem in problems:
        print(problem)
    print(f"{report_dir}: " + ("every number equals its source" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
