"""Task metrics for held-out evaluation, in numpy float64, and the summaries a report shows.

One implementation for every stage that scores a task (the finetune arms, the report that checks them),
so "accuracy" or "spearman" means the same thing everywhere. The definitions match scikit-learn and
scipy (the tests compare against both), but the library needs neither.

Undefined values are nan, never an exception: a correlation against a constant input (a student that
predicts one value for every example) has no meaning, and a report should show that run as "nan"
rather than refuse to exist. Inputs that are malformed (wrong length, labels out of range, non-finite
numbers) are caller errors and raise ValueError.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TASK_TYPES = ("classification", "regression")
METRIC_NAMES = {"classification": ("accuracy", "macro_f1"), "regression": ("pearson", "spearman")}


def _vector(values, name: str) -> np.ndarray:
    """1-D float64 array of finite numbers (labels arrive from JSON as int or float)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: expected finite numbers, got {int(np.sum(~np.isfinite(array)))} non-finite")
    return array


def _pair(a, b, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vector(a, names[0]), _vector(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[1]}: expected {x.size} values (one per {names[0][:-1]}), got {y.size}")
    if x.size == 0:
        raise ValueError(f"{names[0]}: expected at least one example, got none")
    return x, y


def _class_ids(values: np.ndarray, name: str, num_labels: int) -> np.ndarray:
    ids = values.astype(np.int64)
    if not np.array_equal(ids, values) or ids.min() < 0 or ids.max() >= num_labels:
        bad = values[(ids != values) | (ids < 0) | (ids >= num_labels)][0]
        raise ValueError(f"{name}: expected class ids in 0..{num_labels - 1}, got {float(bad):g}")
    return ids


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_labels: int) -> dict[str, float]:
    """{"accuracy", "macro_f1"} over class ids 0..num_labels-1.

    Macro-F1 averages the per-class F1 = 2TP / (2TP + FP + FN) over *all* `num_labels` classes, as
    sklearn's f1_score(average="macro", labels=range(num_labels), zero_division=0) does: a class that is
    never predicted scores 0, and a class absent from both labels and predictions also scores 0 (rather
    than being dropped), so the number does not depend on which classes a fold happens to contain.
    """
    if not isinstance(num_labels, (int, np.integer)) or isinstance(num_labels, bool) or num_labels < 1:
        raise ValueError(f"num_labels: expected an int >= 1, got {num_labels!r}")
    y, p = _pair(labels, predictions, ("labels", "predictions"))
    y, p = _class_ids(y, "labels", num_labels), _class_ids(p, "predictions", num_labels)
    confusion = np.bincount(y * num_labels + p, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp  # predicted as the class, labelled otherwise
    fn = confusion.sum(axis=1) - tp  # labelled as the class, predicted otherwise
    denominator = 2.0 * tp + fp + fn
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros(num_labels), where=denominator > 0)
    return {"accuracy": float(tp.sum() / y.size), "macro_f1": float(f1.mean())}


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span (scipy.stats.rankdata "average")."""
    x = _vector(values, "values")
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    counts = np.diff(np.r_[starts, x.size])
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = (starts + (counts + 1) / 2.0)[np.cumsum(starts_group) - 1]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; nan when either side is constant (checked exactly: the mean of a constant need not
    equal it in floating point, so a zero-variance test on centred values would let noise through)."""
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    xc /= np.linalg.norm(xc)  # normalise first, as scipy does, so the dot product cannot overflow
    yc /= np.linalg.norm(yc)
    return float(np.clip(xc @ yc, -1.0, 1.0))


def regression_metrics(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """{"pearson", "spearman"}; Spearman is Pearson on average ranks (ties share their mean rank).

    At least two examples are required (ValueError). A constant targets or predictions vector makes
    both correlations nan (scipy returns nan too, with a warning); the caller shows nan, not a guess.
    """
    t, p = _pair(targets, predictions, ("targets", "predictions"))
    if t.size < 2:
        raise ValueError(f"targets: expected at least 2 examples for a correlation, got {t.size}")
    return {"pearson": _pearson(t, p), "spearman": _pearson(average_ranks(t), average_ranks(p))}


def task_metrics(task_type: str, labels: Sequence[float], predictions: Sequence[float],
                 num_labels: int | None = None) -> dict[str, float]:
    """The metrics of `task_type` ("classification" needs num_labels; "regression" ignores it)."""
    if task_type == "classification":
        if num_labels is None:
            raise ValueError("num_labels: expected an int >= 1 for a classification task, got None")
        return classification_metrics(labels, predictions, num_labels)
    if task_type == "regression":
        return regression_metrics(labels, predictions)
    raise ValueError(f"task_type: expected one of {', '.join(TASK_TYPES)}, got {task_type!r}")


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """{"mean", "std", "n"} of runs (folds x seeds), in float64.

    std is the sample standard deviation (ddof=1): the runs are a sample of what another seed or fold
    would give. A single run has no spread to estimate; its std is reported as 0.0 (with n=1 beside it,
    so a reader can tell) rather than nan, so tables stay numeric. A nan value (an undefined correlation)
    propagates to mean and std: hiding it would overstate the arm. No values at all raises ValueError.
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("values: expected at least one value to summarise, got none")
    std = float(np.std(array, ddof=1)) if array.size > 1 else (0.0 if np.isfinite(array[0]) else math.nan)
    return {"mean": float(np.mean(array)), "std": std, "n": int(array.size)}


def percent_of(value: float, reference: float) -> float:
    """100 * value / reference ("% of teacher"); nan when reference is 0 or either input is not finite.

    nan rather than ValueError because a report row must still render when, e.g., a teacher's
    correlation is exactly 0 or undefined. Computed as 100 * (value / reference) so that an arm
    compared with itself gives exactly 100.0.
    """
    value, reference = float(value), float(reference)
    if reference == 0.0 or not (math.isfinite(value) and math.isfinite(reference)):
        return math.nan
    return 100.0 * (value / reference)
