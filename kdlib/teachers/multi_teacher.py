"""Several teachers' transfer sets over the same rows, combined into one soft target per example.

MT-DNN's ensemble distillation and TextBrewer's MultiTeacherDistiller both train one student on the
average of several teachers' outputs. Each teacher's outputs are cached in its own transfer set, built
by the same pipeline config except the teacher, so the sets hold the same rows (ids, order, input ids)
and differ only in `logits`. `MultiTeacherSet` checks that cheaply at open (row ids only, no logits
read) and again per batch (input ids), because averaging logits of different rows is silently wrong.

Two combinations (see `combine_teacher_logits`):
  mean_logits  z = sum_i w_i z_i                                  (TextBrewer's average of logits)
  mean_probs   z = T log sum_i w_i softmax(z_i / T)               (average of the teachers' distributions)
For mean_probs, softmax(z / T) equals the weighted mean of the teachers' softmax(z_i / T) exactly, so
`temperature` must be the temperature the KD loss applies (at another temperature the student would
see a sharpened/flattened mixture instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from kdlib.cache.manifest import missing_shard
from kdlib.cache.reader import TransferSet
from kdlib.errors import CacheError

COMBINES = ("mean_logits", "mean_probs")


@dataclass
class MultiTeacherConfig:
    """How several teachers' dense logits become one target."""

    combine: Literal["mean_logits", "mean_probs"] = "mean_logits"  # average the logits, or the probabilities at `temperature`
    weights: list[float] = field(default_factory=list)  # one non-negative weight per teacher (normalised to sum 1); empty: equal
    temperature: float = 1.0  # mean_probs: the temperature at which probabilities are averaged (use the KD loss's)

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ValueError(f"combine: expected one of {', '.join(COMBINES)}, got {self.combine!r}")
        weights = list(self.weights)
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
            raise ValueError(f"weights: expected finite numbers, got {weights}")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights: expected non-negative numbers, got {weights}")
        if weights and sum(weights) <= 0:
            raise ValueError(f"weights: expected at least one positive weight, got {weights}")
        if isinstance(self.temperature, bool) or not (isinstance(self.temperature, (int, float))
                                                      and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {self.temperature!r}")

    def normalized_weights(self, num_teachers: int) -> list[float]:
        """The weights for `num_teachers` teachers, summing to 1 (equal when none were given)."""
        if num_teachers < 1:
            raise ValueError(f"num_teachers: expected at least 1, got {num_teachers}")
        if not self.weights:
            return [1.0 / num_teachers] * num_teachers
        if len(self.weights) != num_teachers:
            raise ValueError(f"weights: expected one weight per teacher ({num_teachers}), got {len(self.weights)}")
        total = float(sum(self.weights))
        return [float(w) / total for w in self.weights]


def combine_teacher_logits(logits: Sequence[Tensor], config: MultiTeacherConfig) -> Tensor:
    """One (B, C) target from T teachers' (B, C) logits, computed in float64, returned in the inputs' dtype.

    mean_logits: sum_i w_i z_i. mean_probs: T * logsumexp_i(log w_i + log_softmax(z_i / T)), i.e.
    T * log(sum_i w_i softmax(z_i / T)) without forming probabilities that underflow; each row's
    logsumexp of z / T is 0, so softmax(z / T) is the mixture itself. A teacher of weight 0 adds log 0 =
    -inf, which logsumexp ignores.
    """
    if not logits:
        raise ValueError("logits: expected at least one teacher's (B, C) logits, got none")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"logits: expected T tensors of one (B, C) shape, got shapes {[tuple(z.shape) for z in logits]}")
    weights = torch.tensor(config.normalized_weights(len(logits)), dtype=torch.float64, device=logits[0].device)
    stacked = torch.stack([z.to(torch.float64) for z in logits])  # (T, B, C)
    if config.combine == "mean_logits":
        out = torch.einsum("t,tbc->bc", weights, stacked)
    else:
        temperature = float(config.temperature)
        log_probs = torch.log_softmax(stacked / temperature, dim=-1)
        out = temperature * torch.logsumexp(torch.log(weights)[:, None, None] + log_probs, dim=0)
    return out.to(logits[0].dtype)


def _row_ids(ts: TransferSet) -> pa.ChunkedArray:
    """The `id` column in global row order, read alone from each shard (no logits decoded)."""
    chunks = []
    for shard in ts.manifest.shards:
        path = ts.path / shard.file
        try:
            with pq.ParquetFile(path) as handle:
                column = handle.read(columns=["id"]).column("id")
        except FileNotFoundError:
            raise missing_shard(path) from None
        if len(column) != shard.rows:
            raise CacheError(f"{path}: shard holds {len(column)} rows, the manifest says {shard.rows}")
        chunks.extend(column.cast(pa.large_string()).chunks)
    return pa.chunked_array(chunks, type=pa.large_string())


def _first_difference(a: pa.ChunkedArray, b: pa.ChunkedArray) -> int:
    same = pc.equal(a, b).to_numpy(zero_copy_only=False)
    return int(np.flatnonzero(~same)[0])


def _per_teacher(key: str) -> bool:
    """Batch keys holding one teacher's outputs (top-k, log-sum-exp, hidden states, pooled, logits)."""
    return key.startswith("teacher_") or key in ("topk_ids", "topk_logits")


def _first_differing_row(a: dict, b: dict) -> Optional[int]:
    """Position in the batch of the first row whose (unpadded) input ids differ between two batches, or None."""
    if a["input_ids"].shape == b["input_ids"].shape and torch.equal(a["input_ids"], b["input_ids"]):
        return None
    for r in range(a["input_ids"].shape[0]):
        x = a["input_ids"][r][a["attention_mask"][r].bool()]
        y = b["input_ids"][r][b["attention_mask"][r].bool()]
        if x.shape != y.shape or not torch.equal(x, y):
            return r
    return 0  # same tokens, other padding: cannot happen with one pad_id, but never pass silently


class MultiTeacherSet:
    """Transfer sets of the same rows by different teachers; `batch` returns the first set's batch with
    `teacher_logits` replaced by their combination and `teacher_logits_each` (T, B, C) added.

    Other teacher outputs (top-k, log-sum-exp, hidden states, pooled) are dropped from the batch: they live in each
    teacher's own space and cannot be averaged, and keeping only the first teacher's would silently make
    an intermediate-layer loss distil from one teacher. Holds no mutable state of its own, so it is as
    thread-safe as TransferSet (a prefetch thread and the training thread may call `batch` at once).
    """

    def __init__(self, sets: Sequence[TransferSet], config: Optional[MultiTeacherConfig] = None):
        self.sets = list(sets)
        self.config = config or MultiTeacherConfig()
        if len(self.sets) < 2:
            raise ValueError(f"sets: expected at least 2 transfer sets (one per teacher), got {len(self.sets)}")
        self.weights = self.config.normalized_weights(len(self.sets))
        self._check_manifests()
        self._check_rows()

    def _check_manifests(self) -> None:
        first = self.sets[0]
        for ts in self.sets:
            if not ts.manifest.cached.get("dense_logits"):
                raise CacheError(f"{ts.path}: holds no dense teacher logits; a multi-teacher set needs each set "
                                 "built with teacher_outputs.dense_logits: true by a sequence_classification teacher")
        seen: dict[str, TransferSet] = {}
        for ts in self.sets:
            fingerprint = ts.manifest.teacher_fingerprint
            if fingerprint in seen:
                raise CacheError(f"{seen[fingerprint].path} and {ts.path}: both were made by teacher {fingerprint}; "
                                 "a multi-teacher set needs a different teacher per transfer set")
            seen[fingerprint] = ts
        for ts in self.sets[1:]:
            if ts.manifest.tokenizer_fingerprint != first.manifest.tokenizer_fingerprint:
                raise CacheError(f"{ts.path}: tokenized with tokenizer {ts.manifest.tokenizer_fingerprint}, but "
                                 f"{first.path} with {first.manifest.tokenizer_fingerprint}; the teachers must share one")
            mine, theirs = ts.manifest.cached.get("labels"), first.manifest.cached.get("labels")
            if mine != theirs:  # logit c must mean the same class in every teacher
                raise CacheError(f"{ts.path}: label names {mine} differ from {first.path}'s {theirs}")

    def _check_rows(self) -> None:
        first, first_ids = self.sets[0], _row_ids(self.sets[0])
        for ts in self.sets[1:]:
            if len(ts) != len(first):
                raise CacheError(f"{ts.path}: holds {len(ts)} rows, but {first.path} holds {len(first)}; the sets "
                                 "must be built from the same rows (same pipeline config except the teacher)")
            ids = _row_ids(ts)
            if not ids.equals(first_ids):
                i = _first_difference(first_ids, ids)
                raise CacheError(f"{ts.path}: row {i} has id {ids[i].as_py()!r} but {first.path} row {i} has id "
                                 f"{first_ids[i].as_py()!r}; the sets must hold the same rows in the same order")

    def __len__(self) -> int:
        return len(self.sets[0])

    def batch_keys(self) -> list[str]:
        """The teacher/label keys `batch` fills (the per-teacher outputs it drops are not among them)."""
        cached = self.sets[0].manifest.cached
        return (["teacher_logits", "teacher_logits_each"] + (["labels"] if cached.get("labels") else [])
                + (["mlm_labels"] if cached.get("mlm") else []))

    def batch(self, indices, pad_id: int = 0) -> dict:
        """The first set's batch of these rows, with the combined and the per-teacher dense logits."""
        indices = [int(i) for i in indices]
        batches = [ts.batch(indices, pad_id=pad_id) for ts in self.sets]
        first = batches[0]
        for ts, b in zip(self.sets[1:], batches[1:]):
            row = _first_differing_row(first, b)
            if row is not None:
                raise CacheError(f"{ts.path}: row {indices[row]} has other input ids than in {self.sets[0].path}; "
                                 "the teachers must have been run on identical token sequences")
            if "labels" in first and not torch.equal(b.get("labels", first["labels"]), first["labels"]):
                raise CacheError(f"{ts.path}: gold labels differ from {self.sets[0].path}'s for rows {indices}")
            if b["teacher_logits"].shape != first["teacher_logits"].shape:
                raise CacheError(f"{ts.path}: teacher logits of shape {tuple(b['teacher_logits'].shape)}, but "
                                 f"{self.sets[0].path}'s are {tuple(first['teacher_logits'].shape)}")
        each = [b["teacher_logits"] for b in batches]
        out = {k: v for k, v in first.items() if not _per_teacher(k)}
        out["teacher_logits"] = combine_teacher_logits(each, self.config)
        out["teacher_logits_each"] = torch.stack(each)
        return out


__all__ = ["MultiTeacherConfig", "combine_teacher_logits", "MultiTeacherSet"]
