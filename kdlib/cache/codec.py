"""How a transfer set with ``topk_encoding: q8`` stores the teacher's top-k (pure numpy, one job per function).

Per position, the k entries are sorted by id ascending (their logits permuted with them) and stored as
* ``topk_id_deltas`` (T*k,): the first id, then the differences to the previous id, in the narrowest
  type that holds any id (uint16 up to a 65,536-id vocabulary, else int32: a difference is at most V-1);
* ``topk_levels`` (T*k,) uint8: the logit as a level below the position's maximum, 0 for the argmax only;
* ``topk_max`` (T,) float32: the maximum logit (the argmax is decoded exactly);
* ``topk_step`` (T,) float16: the level width, the smallest float16 >= (max - min) / 255.
Every entry but the argmax, at gap g = max - z, takes level u = ceil(g / step) clipped to [1, 255] and
decodes to the centre of its bin, max - (u - 1/2) * step, so |decoded - z| <= step / 2 for every entry
(in exact arithmetic; the float32 result adds at most half a float32 ulp).

Why (measured by ``python -m bench.cache_codec`` on the demo teacher, top-32): ids sorted by id and
delta-coded cost 1.2-1.4 bytes each under Parquet's BYTE_STREAM_SPLIT + zstd, against 1.8 in logit order
with the default dictionary encoding (levels in logit order would compress to ~0.55 bytes against ~0.9 in
id order, but that loses more on the ids than it wins). A per-position step never clips: a fixed step of
1/16 saves ~4.5 bytes per position but doubles the largest error and adds ~50x the KL, and 1/32 already
clips wide positions (largest error 0.8). A
float32 maximum costs ~1.7 bytes per position more than a float16 one and keeps the bound step / 2 and the
argmax exact. The log-sum-exp stays float32 (byte-stream-split: ~2 bytes fewer, the same values). The
reconstruction's KL moves by ~1e-6 against fp16's at every k: the top-k's own truncation dominates it.

The reader restores the descending-by-logit order with one integer sort of (level, id) per position:
kd_topk itself is order-free (softmax / log-sum-exp over the k entries), but ``topk_ids[..., 0]`` is read
as the teacher's top-1 (pretrain/evaluate.py), and the batch keeps fp16's layout. Level 0 is the argmax's
alone, so that first entry is exact; entries with equal levels (logits within one step) come in id order.

``encode_sorted_ids`` / ``decode_sorted_ids`` delta-code any ascending ids in positions of varying sizes
(the sampled cache's unique ids per position).
"""

from __future__ import annotations

import numpy as np

TOPK_ENCODINGS = ("fp16", "q8")
LEVELS = 255  # levels 1..255 below the maximum; 0 is the argmax's
Q8_COLUMNS = ("topk_id_deltas", "topk_levels", "topk_max", "topk_step")
TOPK_COLUMNS = ("topk_ids", "topk_logits", "lse") + Q8_COLUMNS  # every column a cached top-k takes, either encoding


def quantize_logits(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, k) logits -> levels (N, k) uint8 (0 at each row's first argmax), max (N,) float32, step (N,) float16."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"topk_logits: expected (positions, k >= 1) values, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("topk_logits: expected finite logits, got inf or nan")
    top = np.argmax(z, axis=1)
    peak = z[np.arange(len(z)), top]
    gap = peak.astype(np.float64)[:, None] - z.astype(np.float64)
    width = gap.max(axis=1) / LEVELS
    step = width.astype(np.float16)
    short = step.astype(np.float64) < width  # round up, so max - min fits in 255 levels
    step[short] = np.nextafter(step[short], np.float16(np.inf))
    if not np.isfinite(step).all():
        raise ValueError("topk_logits: a position's logit range exceeds what a float16 step can span")
    s = step.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(s > 0, np.ceil(gap / np.where(s > 0, s, 1.0)), 1.0)
    levels = np.clip(levels, 1, LEVELS).astype(np.uint8)
    levels[np.arange(len(z)), top] = 0
    return levels, peak, step


def dequantize_logits(levels: np.ndarray, peak: np.ndarray, step: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Levels (..., k), max (...) and step (...) -> logits (..., k): max at level 0, max - (u - 1/2) step else."""
    # In float32 too this is max minus an exact product (a half-integer below 256 times a float16), rounded
    # once: the float64 value rounded to float32, at a fifth of the cost.
    t = np.dtype(dtype).type
    centre = np.maximum(np.asarray(levels, dtype=t) - t(0.5), t(0))  # level 0: the max itself
    return np.asarray(peak, dtype=t)[..., None] - centre * np.asarray(step, dtype=t)[..., None]


def encode_sorted_ids(ids: np.ndarray, sizes: np.ndarray, dtype) -> np.ndarray:
    """Flat ids, ascending within each position of sizes[i] entries -> the first id then differences (flat,
    `dtype`). A difference is at most the largest id, so the ids' own narrowest dtype holds it."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    starts = np.cumsum(np.asarray(sizes, dtype=np.int64)) - np.asarray(sizes, dtype=np.int64)
    deltas = np.diff(ids, prepend=0)
    first = starts[np.asarray(sizes) > 0]
    deltas[first] = ids[first]
    if (deltas < 0).any():
        raise ValueError("ids: expected ascending ids within each position")
    return deltas.astype(dtype)


def decode_sorted_ids(deltas: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Inverse of encode_sorted_ids: flat int64 ids (a running sum restarted at each position)."""
    deltas = np.asarray(deltas, dtype=np.int64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = np.cumsum(deltas)
    ends = np.cumsum(sizes)
    before = np.concatenate([[0], total])[ends - sizes]  # running sum before each position's first entry
    return total - np.repeat(before, sizes)


def encode_topk(ids: np.ndarray, logits: np.ndarray, id_dtype) -> dict[str, np.ndarray]:
    """(N, k) ids and float32 logits of N positions -> the q8 columns of module docstring (flat arrays)."""
    ids = np.asarray(ids, dtype=np.int64)
    levels, peak, step = quantize_logits(logits)
    order = np.argsort(ids, axis=1, kind="stable")
    ids, levels = np.take_along_axis(ids, order, 1), np.take_along_axis(levels, order, 1)
    n, k = ids.shape
    return {"topk_id_deltas": encode_sorted_ids(ids, np.full(n, k), id_dtype), "topk_levels": levels.reshape(-1),
            "topk_max": peak, "topk_step": step}


def decode_topk(deltas: np.ndarray, levels: np.ndarray, peak: np.ndarray, step: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Stored (..., k) deltas and levels, (...) max and step -> int64 ids and float32 logits (..., k) sorted by
    logit, descending (the fp16 layout). All-zero padding decodes to ids 0 and logits 0."""
    ids = np.cumsum(deltas, axis=-1, dtype=np.int64)
    # one integer sort of (level, id) pairs packed as level * 2^32 + id: by level, ties by id (the stored
    # order), several times faster than an argsort and two gathers
    key = np.sort((np.asarray(levels, dtype=np.int64) << 32) | ids, axis=-1)
    return key & 0xFFFFFFFF, dequantize_logits(key >> 32, peak, step)


def stored_topk_logits(logits: np.ndarray, encoding: str) -> np.ndarray:
    """What a reader gets back for (N, k) float32 top-k logits sorted descending, stored with `encoding`."""
    if encoding == "fp16":
        return np.asarray(logits, dtype=np.float16).astype(np.float32)
    if encoding == "q8":
        levels, peak, step = quantize_logits(logits)
        return dequantize_logits(levels, peak, step)
    raise ValueError(f"topk_encoding: expected one of {list(TOPK_ENCODINGS)}, got {encoding!r}")
