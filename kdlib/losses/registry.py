"""Name -> loss-function registry, so configs can name objectives and be validated early.

Conventions every registered loss follows (checked here or by tests):
  * runtime inputs (tensors, projections, step counters) are positional-or-keyword parameters with
    shape-carrying names; configuration options are keyword-only parameters with defaults, so
    ``ObjectiveConfig.params`` can be validated against ``inspect.signature``;
  * the docstring's first line is "formula -- source paper";
  * teacher-side tensors are treated as constants (detached);
  * token-level losses take ``mask`` (1 = real token, 0 = padding) and padding never contributes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

KINDS = ("output", "intermediate", "relational", "mutual", "regularizer")


class UnknownLossError(ValueError, KeyError):
    """An unregistered loss name; is both a ValueError (config validation) and a KeyError (lookup)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class LossSpec:
    """One registry entry."""

    name: str  # registry key used in configs
    fn: Callable[..., Any]  # the pure loss function
    kind: str  # one of KINDS
    paper: str  # short citation of the source paper
    formula: str  # first docstring line of fn
    reads_class_distribution: bool = False  # compares softmaxes over outputs (meaningless on a one-output head)

    def options(self) -> dict[str, inspect.Parameter]:
        """Keyword-only parameters of the loss: the keys ``ObjectiveConfig.params`` may set."""
        sig = inspect.signature(self.fn)
        return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def inputs(self) -> list[str]:
        """Runtime (non-config) parameter names, in order."""
        sig = inspect.signature(self.fn)
        return [n for n, p in sig.parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)]


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(name: str, *, kind: str, paper: str,
                  class_distribution: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding ``fn`` under ``name``; rejects duplicates, bad kinds and missing docstrings.
    ``class_distribution``: the loss reads class distributions (a softmax over the outputs)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name].fn.__module__})")
        doc = (fn.__doc__ or "").strip()
        if not doc:
            raise ValueError(f"loss {name!r}: docstring with a 'formula -- source' first line is required")
        for pname, p in inspect.signature(fn).parameters.items():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty:
                raise ValueError(f"loss {name!r}: option {pname!r} needs a default")
        _REGISTRY[name] = LossSpec(name=name, fn=fn, kind=kind, paper=paper, formula=doc.splitlines()[0],
                                   reads_class_distribution=class_distribution)
        fn.loss_name = name  # type: ignore[attr-defined]
        return fn

    return deco


_CHUNKED: dict[str, Callable[..., Any]] = {}


def register_chunked(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding ``fn`` as the chunked twin of the registered loss ``name``.

    A twin takes the same parameters as the loss (checked here: same names, kinds and option
    defaults), receives the student logits as `kdlib.losses.chunked.FactoredLogits`, and returns a
    `ChunkTerm` (or None when it cannot serve these inputs, e.g. a per-position temperature: the
    dense loss then runs on materialised logits)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        dense = get_spec(name).fn
        want = [(n, p.kind, p.default) for n, p in inspect.signature(dense).parameters.items()]
        got = [(n, p.kind, p.default) for n, p in inspect.signature(fn).parameters.items()]
        if want != got:
            raise ValueError(f"chunked twin of {name!r}: expected the parameters of {dense.__name__} {want}, got {got}")
        if name in _CHUNKED:
            raise ValueError(f"loss {name!r} already has a chunked twin (in {_CHUNKED[name].__module__})")
        _CHUNKED[name] = fn
        return fn

    return deco


def get_chunked(name: str) -> Optional[Callable[..., Any]]:
    """The chunked twin of loss ``name``, or None when it has none."""
    return _CHUNKED.get(name)


def known_losses() -> list[str]:
    """Sorted registered names."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> LossSpec:
    """Registry entry for ``name``; UnknownLossError (KeyError and ValueError) lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss {name!r}; known losses: {', '.join(known_losses())}") from None


def get_loss(name: str) -> Callable[..., Any]:
    """The registered function for ``name`` (see get_spec for errors)."""
    return get_spec(name).fn
