"""Typed configs: YAML/JSON -> nested dataclasses, validated before any work starts.

Every mistake a user can make in a config file (unknown field, missing field, wrong type,
impossible value) becomes one `ConfigError` naming the file, the dotted field path and what was
expected. Validation of values lives in each dataclass's `__post_init__` (raising ValueError);
this module only adds the file and the path, so a config class stays a plain dataclass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from kdlib.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING

# Free text that may span lines (a report's notes): every other string field is one line, because its value can
# end up in a path, a log line or a generated script, where a newline or a NUL starts something of its own.
Prose = typing.NewType("Prose", str)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class _FieldError(Exception):
    """Internal: a problem at a dotted path, turned into ConfigError once the file is known."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


def check_positive_ints(owner: Any, *names: str) -> None:
    """ValueError naming the first of `owner`'s fields `names` that is not an int >= 1 (bools refused), for the
    configs' __post_init__ checks; load_config turns it into a ConfigError naming the file and field."""
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def check_optimizer_fields(owner: Any, *names: str, min_warmup: int = 0, warmup_why: str = "") -> None:
    """ValueError naming the first of `owner`'s optimizer fields `names` out of range, for the configs that train:
    learning_rate > 0 (nan refused), weight_decay >= 0, warmup_steps >= min_warmup (`warmup_why`: what needs it)."""
    for name in names:
        if name not in ("learning_rate", "weight_decay", "warmup_steps"):
            raise TypeError(f"check_optimizer_fields: no rule for {name!r}")
        value = getattr(owner, name)
        if name == "learning_rate" and not value > 0:
            raise ValueError(f"learning_rate: expected > 0, got {value}")
        if name == "weight_decay" and value < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {value}")
        if name == "warmup_steps" and value < min_warmup:
            why = f" ({warmup_why})" if warmup_why else ""
            raise ValueError(f"warmup_steps: expected >= {min_warmup}{why}, got {value}")


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp` and build nested dataclasses."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise _FieldError(path, f"expected {_type_name(tp)}, got null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except _FieldError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise _FieldError(path, f"expected {names}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise _FieldError(path, f"expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _FieldError(path, f"expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _FieldError(path, f"expected a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _FieldError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _FieldError(path, f"expected a number, got {value!r}")
        if value != value:  # nan passes every `x < 0` check a config class makes, so no field takes it
            raise _FieldError(path, "expected a number, got nan")
        return float(value)
    if tp is str or tp is Prose:
        if not isinstance(value, str):
            raise _FieldError(path, f"expected a string, got {value!r}")
        control = _CONTROL.search(value) if tp is str else None
        if control:
            raise _FieldError(path, f"expected one line of text, got {value!r} (control character "
                                    f"{control.group()!r} at position {control.start()})")
        return value
    raise _FieldError(path, f"unsupported annotation {tp!r} (a bug in the config class)")


def _build(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass `cls` from a mapping, reporting the first problem with its path."""
    if not isinstance(data, dict):
        raise _FieldError(path or "<top level>", f"expected a mapping ({cls.__name__}), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _FieldError(
            _join(path, unknown[0]),
            f"unknown field; {cls.__name__} accepts: {', '.join(sorted(fields))}",
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise _FieldError(_join(path, name), f"missing required field ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise _FieldError(_field_path_from_message(path, str(err)), _strip_field(str(err))) from err


def _field_path_from_message(path: str, message: str) -> str:
    """`__post_init__` messages start with '<field>: ...'; prefix the field with our path."""
    head, sep, _ = message.partition(":")
    if sep and head and " " not in head.strip():
        return _join(path, head.strip())
    return path or "<top level>"


def _strip_field(message: str) -> str:
    head, sep, rest = message.partition(":")
    if sep and head and " " not in head.strip():
        return rest.strip()
    return message


def from_dict(cls: type[T], data: Any, source: str = "<dict>") -> T:
    """Build and validate `cls` from plain data; `source` names where the data came from."""
    try:
        return _build(cls, data, "")
    except _FieldError as err:
        raise ConfigError(f"{source}: field '{err.path}': {err.message}") from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-8` (no dot) as the string '1e-8', so `eps: 1e-8` would be refused as "expected a
    number": this loader also reads exponent-only numbers as floats, as YAML 1.2 and JSON do."""


_Loader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def yaml_value(text: str) -> Any:
    """`text` parsed as YAML the way config files are (`_Loader`); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)


def read_config_file(path: str | os.PathLike) -> dict:
    """Parse a YAML or JSON file into a mapping, with the file named in any error."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML or JSON config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save the config as UTF-8") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml_value(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, cls: type[T], overrides: dict | None = None) -> T:
    """Load `cls` from a YAML/JSON file; `overrides` (dotted keys) are applied before validation."""
    return from_dict(cls, read_config_data(path, overrides), str(path))


def read_config_data(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """The file's mapping with `overrides` (dotted keys) applied, not yet validated against any class."""
    data = read_config_file(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if node.get(key) is None:  # absent, or an optional section left null: start it
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                prefix = ".".join(parents[:depth + 1])
                raise ConfigError(f"{path}: --set {dotted}: field '{prefix}' is not a section (it holds "
                                  f"{type(node).__name__}), so it has no field '{dotted[len(prefix) + 1:]}'")
        if not leaf:
            raise ConfigError(f"{path}: --set {dotted}: expected a dotted field path such as engine.zero_stage")
        node[leaf] = value
    return data


def to_dict(config: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config, in field order."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def config_hash(config: Any) -> str:
    """Stable sha256 of a config's resolved values (key order and formatting do not matter)."""
    canonical = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def content_hash(config: Any, leave_out: tuple[str, ...]) -> str:
    """Hash of a config less the top-level fields that change where or how fast it runs, never its result."""
    return config_hash({k: v for k, v in to_dict(config).items() if k not in leave_out})
