"""Objective configs: which registered losses make up the training loss, with weights, options and schedules.

Validation happens at construction so a typo in a config fails before any model is loaded.
"""
from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

from kdlib.losses import get_chunked, get_spec, known_losses
from kdlib.losses.chunked import FactoredLogits, fused_loss
from kdlib.losses.schedules import ScheduleConfig


def _literal_choices(annotation: Any) -> Optional[tuple]:
    """Allowed values when an option is annotated Literal[...] (resolved via typing.get_type_hints)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _as_schedule(value: Any, what: str) -> Optional[ScheduleConfig]:
    if value is None or isinstance(value, ScheduleConfig):
        return value
    if isinstance(value, Mapping):
        return ScheduleConfig(**value)
    raise ValueError(f"{what}: expected a ScheduleConfig or mapping, got {type(value).__name__}")


@dataclass
class ObjectiveConfig:
    """One term of the training loss: weight * loss(**inputs, **params)."""

    name: str  # registered loss name (see kdlib.losses.known_losses())
    weight: float = 1.0  # multiplier on this loss in the total
    params: dict[str, Any] = field(default_factory=dict)  # keyword options passed to the loss (e.g. temperature)
    weight_schedule: Optional[ScheduleConfig] = None  # if set, the weight at a step is weight * weight_schedule.value(step, total)
    temperature_schedule: Optional[ScheduleConfig] = None  # if set, overrides params["temperature"] per step

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in known_losses():
            raise ValueError(f"name: expected one of {known_losses()}, got {self.name!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight: expected a finite number >= 0, got {self.weight!r}")
        self.weight = float(self.weight)
        spec = get_spec(self.name)
        options = spec.options()
        hints = typing.get_type_hints(spec.fn)
        if not isinstance(self.params, Mapping):
            raise ValueError(f"params: expected a mapping, got {type(self.params).__name__}")
        self.params = dict(self.params)
        for key, value in self.params.items():
            if key not in options:
                raise ValueError(f"params.{key}: expected one of {sorted(options)} for loss {self.name!r}, "
                                 f"got unknown key {key!r}")
            choices = _literal_choices(hints.get(key))
            if choices is not None and value not in choices:
                raise ValueError(f"params.{key}: expected one of {list(choices)}, got {value!r}")
        if "temperature" in self.params:
            t = self.params["temperature"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"params.temperature: expected a number > 0, got {t!r}")
        self.weight_schedule = _as_schedule(self.weight_schedule, "weight_schedule")
        self.temperature_schedule = _as_schedule(self.temperature_schedule, "temperature_schedule")
        if self.weight_schedule is not None and self.weight_schedule.range()[0] < 0:
            raise ValueError(f"weight_schedule: expected values >= 0, got range {self.weight_schedule.range()}")
        if self.temperature_schedule is not None:
            if "temperature" not in options:
                raise ValueError(f"temperature_schedule: loss {self.name!r} has no temperature option")
            if not self.temperature_schedule.range()[0] > 0:
                raise ValueError(f"temperature_schedule: expected values > 0, got range "
                                 f"{self.temperature_schedule.range()}")

    def weight_at(self, step: int, total_steps: int) -> float:
        """Loss weight at ``step``: ``weight``, times the schedule's value when one is given (they multiply,
        so ``weight: 0.5`` with a 1 -> 0 schedule goes 0.5 -> 0; neither is ever ignored)."""
        if self.weight_schedule is None:
            return self.weight
        return self.weight * self.weight_schedule.value(step, total_steps)

    def reads_total_steps(self) -> bool:
        """True when this term's value depends on the run's length (a schedule, or a loss taking total_steps)."""
        return (self.weight_schedule is not None or self.temperature_schedule is not None
                or "total_steps" in get_spec(self.name).inputs())

    def params_at(self, step: int, total_steps: int) -> dict[str, Any]:
        """Loss options at ``step`` (temperature taken from temperature_schedule if given)."""
        out = dict(self.params)
        if self.temperature_schedule is not None:
            out["temperature"] = self.temperature_schedule.value(step, total_steps)
        return out


def validate_objectives(objectives: Sequence[ObjectiveConfig]) -> list[ObjectiveConfig]:
    """The list unchanged, after rejecting an empty list and duplicate loss names."""
    objectives = list(objectives)
    if not objectives:
        raise ValueError("objectives: expected at least one objective, got an empty list")
    seen: dict[str, int] = {}
    for i, obj in enumerate(objectives):
        if not isinstance(obj, ObjectiveConfig):
            raise ValueError(f"objectives[{i}]: expected ObjectiveConfig, got {type(obj).__name__}")
        if obj.name in seen:
            raise ValueError(f"objectives[{i}].name: duplicate loss {obj.name!r} "
                             f"(already objectives[{seen[obj.name]}])")
        seen[obj.name] = i
    return objectives


def _arguments(objective: ObjectiveConfig, inputs: Mapping[str, Any], step: int, total_steps: int) -> dict:
    """The loss's keyword inputs from ``inputs`` (and the trainer's clock); ValueError naming a missing one."""
    spec = get_spec(objective.name)
    sig = inspect.signature(spec.fn)
    kwargs = {}
    for name in spec.inputs():
        if name in inputs:
            kwargs[name] = inputs[name]
        elif name in ("step", "total_steps"):
            kwargs[name] = step if name == "step" else total_steps
        elif sig.parameters[name].default is inspect.Parameter.empty:
            raise ValueError(f"objective {objective.name!r}: missing input {name!r}")
    return kwargs


def chunk_term(objective: ObjectiveConfig, inputs: Mapping[str, Any], step: int = 0,
               total_steps: int = 1) -> Optional[tuple[float, Any, Any]]:
    """(weight_at(step), ChunkTerm, the FactoredLogits it reads) when the objective reads factored student logits and its loss has a
    chunked twin that serves these inputs; None otherwise (evaluate it with evaluate_objective)."""
    twin = get_chunked(objective.name)
    if twin is None:
        return None
    kwargs = _arguments(objective, inputs, step, total_steps)
    factored = [v for v in kwargs.values() if isinstance(v, FactoredLogits)]
    if len(factored) != 1:
        return None
    term = twin(**kwargs, **objective.params_at(step, total_steps))
    return None if term is None else (objective.weight_at(step, total_steps), term, factored[0])


def evaluate_objective(objective: ObjectiveConfig, inputs: Mapping[str, Any], step: int = 0,
                       total_steps: int = 1) -> Any:
    """weight_at(step) * loss(**inputs it accepts, **params_at(step)); tuples (e.g. dml) are weighted elementwise.

    ``inputs`` may hold more entries than the loss needs (one batch dict serves every objective); a
    missing required input raises ValueError naming it. Factored student logits
    (kdlib.losses.chunked.FactoredLogits) go to the loss's chunked twin, or are materialised for a loss
    without one.
    """
    deferred = chunk_term(objective, inputs, step, total_steps)
    if deferred is not None:
        weight, term, logits = deferred
        return fused_loss(logits, [term], [weight])[0]
    kwargs = {k: v.dense() if isinstance(v, FactoredLogits) else v
              for k, v in _arguments(objective, inputs, step, total_steps).items()}
    value = get_spec(objective.name).fn(**kwargs, **objective.params_at(step, total_steps))
    w = objective.weight_at(step, total_steps)
    if isinstance(value, tuple):
        return tuple(w * v for v in value)
    return w * value


def total_loss(objectives: Sequence[ObjectiveConfig], inputs: Mapping[str, Any], step: int = 0,
               total_steps: int = 1) -> Any:
    """Sum of evaluate_objective over objectives (tuple-valued objectives add all their members)."""
    total = 0.0
    for obj in objectives:
        v = evaluate_objective(obj, inputs, step, total_steps)
        total = total + (sum(v) if isinstance(v, tuple) else v)
    return total
