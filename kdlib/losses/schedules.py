"""Schedules for loss weights and temperatures, plus BAM teacher annealing.

A schedule is a pure function ``f(step, total_steps, **options) -> float`` registered by name;
``ScheduleConfig`` names one and carries its options. Progress is ``p = clip(step / total_steps, 0, 1)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

_SCHEDULES: dict[str, Callable[..., float]] = {}


def register_schedule(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator adding a schedule function under ``name`` (duplicates rejected)."""
    def deco(fn: Callable[..., float]) -> Callable[..., float]:
        if name in _SCHEDULES:
            raise ValueError(f"schedule {name!r} is already registered")
        _SCHEDULES[name] = fn
        return fn
    return deco


def known_schedules() -> list[str]:
    """Sorted registered schedule names."""
    return sorted(_SCHEDULES)


def get_schedule(name: str) -> Callable[..., float]:
    """Schedule function for ``name``; ValueError lists the known names."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(known_schedules())}")
    return _SCHEDULES[name]


def progress(step: int, total_steps: int) -> float:
    """Fraction of training done, clipped to [0, 1]; total_steps must be >= 1."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


@register_schedule("constant")
def constant(step: int, total_steps: int, *, start: float = 1.0, end: float = 1.0,
             milestones: tuple = (), gamma: float = 0.1) -> float:
    """v = start."""
    progress(step, total_steps)
    return float(start)


@register_schedule("linear")
def linear(step: int, total_steps: int, *, start: float = 1.0, end: float = 1.0,
           milestones: tuple = (), gamma: float = 0.1) -> float:
    """v = start + (end - start) * p."""
    return float(start + (end - start) * progress(step, total_steps))


@register_schedule("cosine")
def cosine(step: int, total_steps: int, *, start: float = 1.0, end: float = 1.0,
           milestones: tuple = (), gamma: float = 0.1) -> float:
    """v = end + (start - end) * (1 + cos(pi * p)) / 2 (half-cosine from start to end)."""
    p = progress(step, total_steps)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))


@register_schedule("step")
def step_schedule(step: int, total_steps: int, *, start: float = 1.0, end: float = 1.0,
                  milestones: tuple = (), gamma: float = 0.1) -> float:
    """v = start * gamma ** (number of milestones m with m <= p); milestones are fractions of training."""
    p = progress(step, total_steps)
    return float(start * gamma ** sum(1 for m in milestones if m <= p))


@register_schedule("window")
def window(step: int, total_steps: int, *, start: float = 1.0, end: float = 0.0,
           milestones: tuple = (), gamma: float = 0.1) -> float:
    """v = start while milestones[0] <= p < milestones[1], else end: an objective active in one phase of a run
    (TinyBERT's intermediate-then-prediction schedule as one run)."""
    p = progress(step, total_steps)
    low, high = milestones
    return float(start if low <= p < high else end)


@dataclass
class ScheduleConfig:
    """A named schedule and its options, evaluated with ``value(step, total_steps)``."""

    name: str  # registered schedule: constant | linear | cosine | step | window
    start: float = 1.0  # value at step 0 (constant: the value; step: the value before the first milestone)
    end: float = 1.0  # value at total_steps (linear, cosine); unused by constant and step
    milestones: list[float] = field(default_factory=list)  # step: increasing fractions in (0, 1]; window: [from, to) in [0, 1]
    gamma: float = 0.1  # step: multiplier applied at each milestone passed

    def __post_init__(self) -> None:
        if self.name not in _SCHEDULES:
            raise ValueError(f"name: expected one of {known_schedules()}, got {self.name!r}")
        ms = list(self.milestones)
        if self.name == "window":
            if len(ms) != 2 or not 0.0 <= ms[0] < ms[1] <= 1.0:
                raise ValueError(f"milestones: window expects [from, to) with 0 <= from < to <= 1, got {ms}")
        elif any(not (0.0 < m <= 1.0) for m in ms) or ms != sorted(ms):
            raise ValueError(f"milestones: expected increasing fractions in (0, 1], got {ms}")
        if not self.gamma > 0:
            raise ValueError(f"gamma: expected > 0, got {self.gamma}")
        for f in ("start", "end", "gamma"):
            if not math.isfinite(getattr(self, f)):
                raise ValueError(f"{f}: expected a finite number, got {getattr(self, f)}")

    def value(self, step: int, total_steps: int) -> float:
        """Scheduled value at ``step`` of ``total_steps``."""
        return get_schedule(self.name)(step, total_steps, start=self.start, end=self.end,
                                       milestones=tuple(self.milestones), gamma=self.gamma)

    def range(self) -> tuple[float, float]:
        """(min, max) the schedule can take over training; used to validate e.g. temperatures > 0."""
        if self.name == "step":
            vals = [self.start * self.gamma ** i for i in range(len(self.milestones) + 1)]
        elif self.name == "constant":
            vals = [self.start]
        elif self.name == "window":
            vals = [self.start, self.end]
        else:
            vals = [self.start, self.end]
        return min(vals), max(vals)


def teacher_annealing_lambda(step: int, total_steps: int) -> float:
    """BAM teacher annealing (Clark et al. 2019): lambda = step / total_steps, going 0 -> 1 linearly."""
    return linear(step, total_steps, start=0.0, end=1.0)


def teacher_annealing_targets(teacher_probs: Tensor, labels: Tensor, lam: float, *,
                              ignore_index: int = -100) -> Tensor:
    """lam * onehot(labels) + (1 - lam) * teacher_probs (Clark et al. 2019); ignored labels keep teacher_probs."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: expected in [0, 1], got {lam}")
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    onehot = torch.nn.functional.one_hot(safe, teacher_probs.shape[-1]).to(teacher_probs.dtype)
    mixed = lam * onehot + (1.0 - lam) * teacher_probs
    return torch.where(keep.unsqueeze(-1), mixed, teacher_probs)
