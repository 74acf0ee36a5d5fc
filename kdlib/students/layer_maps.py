"""Which teacher layer teaches which student layer: fixed maps (uniform, PKD-skip, PKD-last, explicit) and BERT-EMD.

CONVENTION: a map is a list of ``(teacher_layer, student_layer)`` pairs with layers numbered like Hugging Face
``output_hidden_states``: 0 = embedding output, 1..L = outputs of transformer layers 1..L (1-based).
Models have M teacher and N student transformer layers.

BERT-EMD (Li et al. 2020, EMNLP, "BERT-EMD: Many-to-Many Layer Mapping for BERT Compression with Earth
Mover's Distance"; reference code github.com/lxk00/BERT-EMD, ``get_new_layer_weight``) replaces a fixed map
by an exact optimal-transport plan F (M x N) between teacher layer weights w^T and student layer weights w^S
(both start uniform) under a cost D (M x N, D_ji = distance(teacher layer j, student layer i)); the loss is
sum F * D (``kdlib.losses.bert_emd``). After each step the weights are updated from the transported cost:
    C^T_j = sum_i F_ji D_ji / w^T_j,     w~^T_j = (sum_j' C^T_j') / C^T_j,     w^T = softmax(w~^T / tau)
    C^S_i = sum_j F_ji D_ji / w^S_i,     w~^S_i = (sum_i' C^S_i') / C^S_i,     w^S = softmax(w~^S / tau)
so layers that transport cheaply get more weight. As in the reference code, a layer whose transported cost
is exactly 0 gets w~ = 0 (not an infinite weight) before the softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import ot
import torch
from torch import Tensor

Pairs = list[tuple[int, int]]


def _check_depths(num_teacher_layers: int, num_student_layers: int, what: str) -> None:
    if num_teacher_layers < 1 or num_student_layers < 1:
        raise ValueError(f"{what}: expected >= 1 layers, got teacher={num_teacher_layers}, "
                         f"student={num_student_layers}")
    if num_student_layers > num_teacher_layers:
        raise ValueError(f"{what}: student ({num_student_layers} layers) is deeper than teacher "
                         f"({num_teacher_layers} layers)")


def uniform(num_teacher_layers: int, num_student_layers: int, *, include_embeddings: bool = False) -> Pairs:
    """TinyBERT uniform map: student layer m <- teacher layer floor(m * M / N), m = 1..N (exact when N divides M)."""
    _check_depths(num_teacher_layers, num_student_layers, "uniform")
    pairs = [((m * num_teacher_layers) // num_student_layers, m) for m in range(1, num_student_layers + 1)]
    return ([(0, 0)] if include_embeddings else []) + pairs


def skip(num_teacher_layers: int, num_student_layers: int) -> Pairs:
    """BERT-PKD-Skip: student layer m <- teacher layer floor(m * M / N), m = 1..N-1 (last layer left to output KD)."""
    _check_depths(num_teacher_layers, num_student_layers, "skip")
    if num_student_layers < 2:
        raise ValueError("skip: expected a student with >= 2 layers (PKD excludes the last layer)")
    return [((m * num_teacher_layers) // num_student_layers, m) for m in range(1, num_student_layers)]


def last(num_teacher_layers: int, num_student_layers: int) -> Pairs:
    """BERT-PKD-Last: student layer m <- teacher layer M - N + m, m = 1..N-1 (e.g. 12 -> 6: teacher 7..11)."""
    _check_depths(num_teacher_layers, num_student_layers, "last")
    if num_student_layers < 2:
        raise ValueError("last: expected a student with >= 2 layers (PKD excludes the last layer)")
    return [(num_teacher_layers - num_student_layers + m, m) for m in range(1, num_student_layers)]


def explicit(pairs: Sequence[Sequence[int]], num_teacher_layers: int, num_student_layers: int) -> Pairs:
    """User-given (teacher_layer, student_layer) pairs, validated: 0 <= t <= M, 0 <= s <= N, no duplicates."""
    if num_teacher_layers < 1 or num_student_layers < 1:
        raise ValueError(f"explicit: expected >= 1 layers, got teacher={num_teacher_layers}, "
                         f"student={num_student_layers}")
    out: Pairs = []
    for k, p in enumerate(pairs):
        if len(p) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p):
            raise ValueError(f"pairs[{k}]: expected (teacher_layer, student_layer) integers, got {p!r}")
        t, s = int(p[0]), int(p[1])
        if not 0 <= t <= num_teacher_layers:
            raise ValueError(f"pairs[{k}]: teacher layer {t} out of range [0, {num_teacher_layers}]")
        if not 0 <= s <= num_student_layers:
            raise ValueError(f"pairs[{k}]: student layer {s} out of range [0, {num_student_layers}]")
        if (t, s) in out:
            raise ValueError(f"pairs[{k}]: duplicate pair {(t, s)}")
        out.append((t, s))
    if not out:
        raise ValueError("pairs: expected at least one (teacher_layer, student_layer) pair")
    return out


LAYER_MAPS: dict[str, Callable[..., Pairs]] = {"uniform": uniform, "skip": skip, "last": last}


@dataclass
class LayerMapConfig:
    """Chooses a layer map by name; ``build(M, N)`` returns its (teacher_layer, student_layer) pairs."""

    name: str  # uniform | skip | last | explicit | emd (emd has no fixed pairs: use EmdLayerWeights)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # explicit: (teacher_layer, student_layer), 0 = embeddings
    include_embeddings: bool = False  # uniform: also pair the embedding outputs (0, 0)
    emd_temperature: float = 1.0  # emd: temperature tau of the BERT-EMD weight softmax

    def __post_init__(self) -> None:
        known = sorted(LAYER_MAPS) + ["emd", "explicit"]
        if self.name not in known:
            raise ValueError(f"name: expected one of {known}, got {self.name!r}")
        if self.name == "explicit" and not self.pairs:
            raise ValueError("pairs: expected at least one pair for the explicit map")
        if self.name != "explicit" and self.pairs:
            raise ValueError(f"pairs: only used by the explicit map, got pairs with name={self.name!r}")
        if not self.emd_temperature > 0:
            raise ValueError(f"emd_temperature: expected > 0, got {self.emd_temperature}")

    def build(self, num_teacher_layers: int, num_student_layers: int) -> Pairs:
        """Pairs for the given depths; ValueError for impossible maps."""
        if self.name == "explicit":
            return explicit(self.pairs, num_teacher_layers, num_student_layers)
        if self.name == "emd":
            raise ValueError("emd: has no fixed pairs; use EmdLayerWeights.plan and losses.bert_emd")
        if self.name == "uniform":
            return uniform(num_teacher_layers, num_student_layers, include_embeddings=self.include_embeddings)
        return LAYER_MAPS[self.name](num_teacher_layers, num_student_layers)


def pairwise_layer_cost(teacher_layers: Sequence[Tensor], student_layers: Sequence[Tensor],
                        distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Differentiable cost D (M, N) with D[j, i] = distance(student_layers[i], teacher_layers[j])."""
    rows = [torch.stack([distance(s, t) for s in student_layers]) for t in teacher_layers]
    return torch.stack(rows)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


class EmdLayerWeights:
    """BERT-EMD layer weights (state) with ``plan`` (exact EMD via POT's ot.emd) and ``update`` (Li et al. 2020)."""

    def __init__(self, num_teacher_layers: int, num_student_layers: int, *, temperature: float = 1.0):
        if num_teacher_layers < 1 or num_student_layers < 1:
            raise ValueError(f"layers: expected >= 1, got teacher={num_teacher_layers}, student={num_student_layers}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.temperature = float(temperature)
        self.teacher_weights = np.full(num_teacher_layers, 1.0 / num_teacher_layers)
        self.student_weights = np.full(num_student_layers, 1.0 / num_student_layers)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.teacher_weights), len(self.student_weights)

    def _cost(self, cost) -> np.ndarray:
        c = _as_numpy(cost)
        if c.shape != self.shape:
            raise ValueError(f"cost: expected shape {self.shape} (teacher layers, student layers), got {c.shape}")
        if not np.isfinite(c).all():
            raise ValueError("cost: expected finite values")
        return c

    def plan(self, cost) -> np.ndarray:
        """Optimal transport plan F (M, N) from teacher weights to student weights under ``cost`` (ot.emd).

        When all costs are equal every plan is optimal; we then return the independent coupling w^T w^S^T
        (uniform for uniform weights) instead of an arbitrary vertex of the transport polytope.
        """
        c = self._cost(cost)
        a, b = self.teacher_weights, self.student_weights
        if np.ptp(c) <= 1e-12 * max(1.0, float(np.abs(c).max())):
            return np.outer(a, b)
        return ot.emd(a, b, c)

    def update(self, cost, plan) -> None:
        """Re-weight layers from the transported cost (formula in the module docstring)."""
        c, f = self._cost(cost), _as_numpy(plan)
        if f.shape != self.shape:
            raise ValueError(f"plan: expected shape {self.shape}, got {f.shape}")
        moved = f * c
        self.teacher_weights = self._reweight(moved.sum(axis=1), self.teacher_weights)
        self.student_weights = self._reweight(moved.sum(axis=0), self.student_weights)

    def _reweight(self, transported: np.ndarray, weights: np.ndarray) -> np.ndarray:
        per_weight = transported / np.maximum(weights, 1e-300)
        total = per_weight.sum()
        safe = np.where(per_weight != 0, per_weight, 1.0)
        inv = np.where(per_weight != 0, total / safe, 0.0)
        return _softmax(inv / self.temperature)
