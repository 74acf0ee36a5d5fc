"""Every value a launcher puts into a generated script or a rank's command line: checked in the syntax of the place it
goes, and quoted, here and nowhere else (launch/slurm.py's sbatch script, launch/dask_block.py's lines in it,
launch/local.py's ranks).

A bad value fails before anything runs, in one line naming its flag or field. A legal one reaches the script as the
user typed it: a shell word is quoted whole, so a space, a quote, `$( )`, a backquote or a `;` in a path stays part
of the path; a path on the `#SBATCH --output` line, which sbatch reads by its own rules, is escaped for those.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Optional

from kdlib.config import read_config_data
from kdlib.errors import KDError
from kdlib.runtime.cli import parse_overrides

PARTITION = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")  # a partition, or a comma list of them
JOB_NAME = re.compile(r"[A-Za-z0-9_.,+-]+")  # written unquoted after #SBATCH, so only what needs no quoting
# SLURM's time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (minutes and seconds below 60, hours below 24 after days)
TIME = re.compile(r"\d+(:[0-5]\d){0,2}|\d+-([01]?\d|2[0-3])(:[0-5]\d){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
SIGNAL_SECONDS = 65535  # the most sbatch's --signal=SIG@TIME takes


def quote(word: str) -> str:
    """`word` as one shell word, whatever it holds."""
    return shlex.quote(word)


def shell_line(argv: list[str]) -> str:
    """argv as one line of a shell script, every word quoted where it needs it."""
    return " ".join(quote(word) for word in argv)


def count(flag: str, value: int, least: int, most: Optional[int] = None, expected: str = "") -> None:
    """A count in range (`expected`: how the message says the range, default "<least> or more" / "<least>..<most>")."""
    if value < least or (most is not None and value > most):
        span = expected or (f"{least}..{most}" if most is not None else f"{least} or more")
        raise KDError(f"{flag}: expected {span}, got {value}")


def port(flag: str, value: Optional[int]) -> None:
    if value is not None and not 1 <= value <= 65535:
        raise KDError(f"{flag}: expected a TCP port in 1-65535, got {value}")


def slurm_time(flag: str, value: Optional[str]) -> None:
    if value is not None and not TIME.fullmatch(value):
        raise KDError(f"{flag}: expected a SLURM time such as 04:00:00 or 1-12:00:00, got {value!r}")


def partition(flag: str, value: Optional[str]) -> None:
    if value is not None and not PARTITION.fullmatch(value):
        raise KDError(f"{flag}: expected letters, digits and _ . + - only (a comma between partitions), got {value!r}")


def job_name(flag: str, value: Optional[str]) -> None:
    if value is not None and not JOB_NAME.fullmatch(value):
        raise KDError(f"{flag}: expected letters, digits and _ . , + - only, got {value!r}")


def one_line(flag: str, value: str) -> None:
    """No control character: a newline in a value would start a script line of its own."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise KDError(f"{flag}: {value!r} holds a control character (a newline?); it would break the script")


def stage_command(config: str, sets: list[str], stage_args: list[str]) -> dict:
    """What both launchers pass to the stage, checked (each word one line), and its config read as the stage will
    read it (--set applied): a missing or unreadable config fails here once, not in every rank or in the queue."""
    for flag, value in [("--config", config)] + [("--set", v) for v in sets] + [
            ("-- (a stage argument)", v) for v in stage_args]:
        one_line(flag, value)
    return read_config_data(config, parse_overrides(sets))


def sbatch_output(field: str, folder: Path) -> str:
    """`folder` for the `#SBATCH --output="..."` line, which sbatch parses itself: there a backslash escapes the next
    character, and in the file name `%` starts a replacement (`%j`: the job id) and a backslash turns them all off.
    So `"` is escaped and `%` doubled; a backslash, which the name could not keep, is refused."""
    text = str(folder)
    one_line(field, text)
    if "\\" in text:
        raise KDError(f"{field}: {text!r} holds a backslash, which sbatch's --output file pattern cannot keep "
                      "(it turns %j off); choose a path without one")
    return text.replace("%", "%%").replace('"', '\\"')


def log_folder(field: str, folder: Path) -> None:
    """The job's log folder can be written: sbatch's pattern holds it, and no file stands where it or a folder above
    it should be (sbatch, or the script's mkdir, would fail only in the queue)."""
    sbatch_output(field, folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise KDError(f"{field}: {path} is a file; the job's logs go to {folder}")
            return
