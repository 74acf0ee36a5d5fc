"""Fuzz-style checks of a stage's front door (issue 33).

Every config field and CLI flag, given a wrong type, an out-of-range value, a path of the wrong kind, a non-UTF-8
file or a value with a newline, must end in exit 2 with one `error:` line that names the field or flag, and leave
every file that was there before as it was (and make none). A stage's test writes one valid config ("{root}" in
its strings stands for the workspace), asks
`field_cases` for the mutations its config class's annotations imply, adds `path_cases` for its path fields and
`flag_cases` for its parser, and checks each with `assert_refused`.

Cases run in process (the stage's `main(argv)`), so a few hundred take seconds where subprocesses would take
minutes. A mutation that a field legitimately accepts (a seed of -1) is left out by the stage's test, by name,
with the reason beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin

from kdlib.config import Prose

NOT_UTF8 = b"caf\xe9 au lait\n"  # Latin-1, as a spreadsheet export on Windows writes it
NEWLINE = "a\nb"


@dataclass(frozen=True)
class Case:
    """One bad input: `config` (dotted field -> value) set in the valid config, `argv` added after --config, or
    `raw` written as the config file's bytes; the error line must contain one of `names`."""

    label: str
    names: tuple[str, ...]
    config: tuple[tuple[str, Any], ...] = ()
    argv: tuple[str, ...] = ()
    raw: Optional[bytes] = None

    def __str__(self) -> str:  # the pytest id
        return self.label


def _wrong_type(tp: Any) -> Any:
    """A value of another type than annotation `tp` (None where every value fits)."""
    origin = get_origin(tp)
    if origin is Union or type(tp).__name__ == "UnionType":
        options = [o for o in get_args(tp) if o is not type(None)]
        if any(o is Any for o in options):
            return None
        if all(o in (int, float) for o in options):
            return "seven"
        if any(o in (str, Prose) for o in options):
            return {"a": ["mapping"]} if not any(get_origin(o) is dict or dataclasses.is_dataclass(o)
                                                 for o in options) else None
        return "seven" if str not in options else None
    if origin is Literal:
        return "no such choice"
    if tp is bool:
        return "maybe"
    if tp in (int, float):
        return "seven"
    if tp in (str, Prose):
        return ["a", "list"]
    if origin in (list, tuple) or tp in (list, tuple):
        return {"a": 1}
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "text"
    return None


def _out_of_range(tp: Any) -> Any:
    """A value of the right type that no field of this type can mean: -1 for a count, nan for a number."""
    options = [o for o in get_args(tp) if o is not type(None)] if get_origin(tp) is Union else [tp]
    if int in options and float not in options:
        return -1
    if float in options:
        return math.nan
    return None


def field_cases(cls: type, valid: dict, *, skip: dict[str, str] | None = None, prefix: str = "") -> list[Case]:
    """The mutations `cls`'s annotations imply, for each field present in `valid` (a stage's valid config,
    as a mapping): a wrong type; for numbers, -1 or nan; for one-line strings, a value with a newline. Nested
    dataclasses are walked. `skip` ({"<dotted field>/<kind>": why}) leaves out what a field rightly accepts;
    kinds are type, range and newline."""
    skip = skip or {}
    hints = typing.get_type_hints(cls)
    cases = []
    for f in dataclasses.fields(cls):
        if f.name not in valid:
            continue
        tp, dotted = hints[f.name], prefix + f.name
        nested = [o for o in ([tp] + list(get_args(tp))) if dataclasses.is_dataclass(o)]
        if nested and isinstance(valid[f.name], dict):
            cases += field_cases(nested[0], valid[f.name], skip=skip, prefix=dotted + ".")
        kinds = {"type": _wrong_type(tp), "range": _out_of_range(tp)}
        options = [tp] + list(get_args(tp))
        if str in options and Prose not in options:
            kinds["newline"] = NEWLINE
        for kind, value in kinds.items():
            if value is not None and f"{dotted}/{kind}" not in skip:
                cases.append(Case(f"{dotted}/{kind}", (f"'{dotted}'",), config=((dotted, value),)))
    return cases


def _maker(dotted: str, what: str, build: Callable[[Path], None]) -> Callable[[Path], str]:
    """A path made at run time under the test's workspace (cases are listed at collection, before it exists)."""
    def make(workspace: Path) -> str:
        path = workspace / f"fuzz-{dotted.replace('.', '-')}-{what.replace(' ', '-').replace(chr(39), '')}"
        if not path.exists() and not path.is_symlink():
            build(path)
        return str(path)
    return make


def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


def _user_folder(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "notes.md").write_text("# my notes\n")


PATH_KINDS: dict[str, dict[str, Callable[[Path], None]]] = {
    "file": {"missing": lambda path: None, "a folder": _mkdir},
    "text": {"missing": lambda path: None, "a folder": _mkdir, "not UTF-8": lambda path: path.write_bytes(NOT_UTF8)},
    "folder": {"missing": lambda path: None, "a file": lambda path: path.write_text("the user's own file\n")},
    "output": {"a file": lambda path: path.write_text("the user's own file\n"), "the user's folder": _user_folder},
}


def path_cases(dotted: str, kind: Literal["file", "text", "folder", "output"],
               artefact: Optional[Callable[[Path], None]] = None) -> list[Case]:
    """Paths of the wrong kind for field `dotted`: for a file, a missing one and a folder; for a text file also
    a non-UTF-8 one; for a folder, a missing one and a file; for an output folder, a regular file, a folder of
    the user's own files and, where `artefact(folder)` makes one, another stage's artefact."""
    kinds = dict(PATH_KINDS[kind])
    if kind == "output" and artefact is not None:
        kinds["another stage's artefact"] = artefact
    return [Case(f"{dotted}/{what}", (f"'{dotted}'", f"{dotted}:"), config=((dotted, _maker(dotted, what, build)),))
            for what, build in kinds.items()]


def flag_cases(parser: argparse.ArgumentParser, *, skip: dict[str, str] | None = None) -> list[Case]:
    """For each option of `parser`: a word for a number, a choice not offered, a newline in a free string
    (`skip`: {"<flag>/<kind>": why}); and one mistyped flag (`--sett`)."""
    skip = skip or {}
    cases = [Case("--sett/unknown", ("--sett",), argv=("--sett", "x=1"))]
    for action in parser._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags or action.nargs == 0 or flags[0] in ("--config", "--set", "--help"):
            continue
        flag = flags[0]
        values = {}
        if action.choices is not None:
            values["choice"] = "no-such-choice"
        elif action.type in (int, float):
            values["type"] = "seven"
        elif action.type in (None, str):
            values["newline"] = NEWLINE
        for kind, value in values.items():
            if f"{flag}/{kind}" not in skip:
                cases.append(Case(f"{flag}/{kind}", (flag,), argv=(flag, value)))
    return cases


def config_cases() -> list[Case]:
    """The config file itself: not UTF-8, not YAML, not a mapping."""
    name = ("{config}",)
    return [Case("config/not UTF-8", name, raw=b"output_dir: " + NOT_UTF8),
            Case("config/not YAML", name, raw=b"output_dir: [unclosed\n"),
            Case("config/a list", name, raw=b"- a\n- b\n")]


def _set(data: dict, dotted: str, value: Any) -> dict:
    out = json.loads(json.dumps(data))
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return out


def _rooted(value: Any, workspace: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{root}", str(workspace))
    if isinstance(value, dict):
        return {k: _rooted(v, workspace) for k, v in value.items()}
    if isinstance(value, list):
        return [_rooted(v, workspace) for v in value]
    return value


def write_case(case: Case, valid: dict, workspace: Path, config_path: Path) -> None:
    """Write `case`'s config file at `config_path`: `valid` with "{root}" in its strings replaced by `workspace`
    and the case's values set (a path maker is run first). JSON is YAML; a nan goes in as .nan."""
    if case.raw is not None:
        config_path.write_bytes(case.raw)
        return
    data = _rooted(valid, workspace)
    for dotted, value in case.config:
        data = _set(data, dotted, value(workspace) if callable(value) else value)
    text = json.dumps(data, allow_nan=True).replace("NaN", ".nan")
    config_path.write_text(text)


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots`, by path."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """`main(argv)` in process: its exit status (argparse's SystemExit included) and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    return code, out.getvalue() + err.getvalue()


def assert_refused(main: Callable[[list[str]], int], case: Case, valid: dict, workspace: Path,
                   argv_before: tuple[str, ...] = ()) -> str:
    """Run `main([*argv_before, --config, <workspace>/config.yaml, *case.argv])` on `case`'s config: exit 2, one
    `error:` line naming one of `case.names` ("{config}" stands for the config's path), no traceback, every file
    under `workspace` as it was and none new. Returns the error line."""
    config_path = workspace / "config.yaml"
    write_case(case, valid, workspace, config_path)
    before = digests(workspace)
    argv = [*argv_before, "--config", str(config_path), *(_rooted(a, workspace) for a in case.argv)]
    code, printed = run_main(main, argv)
    errors = [line for line in printed.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, f"{case}: exit {code}, printed:\n{printed}"
    names = [name.replace("{config}", str(config_path)) for name in case.names]
    assert any(name in errors[0] for name in names), f"{case}: the error names none of {names}: {errors[0]}"
    assert "Traceback" not in printed, printed
    assert digests(workspace) == before, f"{case}: files changed or appeared under {workspace}"
    return errors[0]
