"""Errors a user can cause: each names the file / field / line and what was expected."""

from contextlib import contextmanager
from typing import Iterator, NoReturn, Optional


class KDError(Exception):
    """Base class for every error this project reports to a user."""


class ConfigError(KDError):
    """A config file is invalid: names the file, the dotted field path and what was expected."""


class ModelLoadError(KDError):
    """A model or tokenizer folder cannot be loaded safely."""


class ReaderError(KDError):
    """A corpus or task file cannot be read: names the file and line."""


class FingerprintMismatch(KDError):
    """A cache or checkpoint was built by another teacher/tokenizer/config."""


class CacheError(KDError):
    """A transfer-set directory is missing, incomplete or corrupted."""


class OutputError(KDError):
    """An output folder may not be written: it holds someone else's files, other inputs' results, or a
    live writer's lock."""


def fail_field(source: str, field: str, message: str) -> NoReturn:
    """The validators' one error shape: ConfigError "<config file>: field '<dotted field>': <message>"."""
    raise ConfigError(f"{source}: field '{field}': {message}")


@contextmanager
def field_named(source: str, field: str, catch: tuple = (), raise_as: Optional[type] = None) -> Iterator[None]:
    """An error about a file or folder a config field points at (a model folder, a reader's file and line)
    re-raised naming that field of that config first: the user edits the config, so the error starts from it.
    `catch`: the KDError kinds to name (default: all); `raise_as`: the class raised (default: the error's own, so a
    FingerprintMismatch stays one)."""
    try:
        yield
    except catch or (KDError,) as err:
        raise (raise_as or type(err))(f"{source}: field '{field}': {err}") from None
