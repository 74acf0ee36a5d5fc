"""Per-position teacher vectors in the cache: hidden states and attention Q/K/V, and how they are stored.

Intermediate targets dominate a transfer set's size (a 384-wide hidden state is 768 bytes per position
in fp16, against ~100 for top-32 logits), so each vector column has an encoding:

* ``fp16``: the values as float16 (2 bytes per unit);
* ``int8``: per position, ``round(x / s)`` in int8 with ``s = max|x| / 127`` stored beside it as one
  float32 (1 byte per unit + 4 per position). The reconstruction ``q * s`` is off by at most ``s / 2``
  per unit, i.e. a relative error of the position's largest unit of at most 1/254.

A column ``hidden_<l>`` / ``query_<l>`` / ``key_<l>`` / ``value_<l>`` holds (T * width,) values;
with int8 a second column ``<name>_scale`` holds the (T,) scales. ``fidelity`` measures what an encoding
loses against the float32 values the teacher produced (cosine and relative L2 error per position),
which the pipeline records in the manifest.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

ENCODINGS = ("fp16", "int8")
QKV_PARTS = ("query", "key", "value")
_VECTOR = re.compile(r"^(hidden|query|key|value)_(\d+)$")
SCALE_SUFFIX = "_scale"


def vector_column(name: str) -> tuple[str, int] | None:
    """(kind, layer) of a cached per-position vector column ("value_4" -> ("value", 4)), None for any other."""
    match = _VECTOR.match(name)
    return (match[1], int(match[2])) if match else None


def is_vector_column(name: str) -> bool:
    """A cached per-position vector (not its scale column)."""
    return vector_column(name) is not None


def vector_names(hidden_layers, qkv_layers) -> list[str]:
    """Column names of the cached vectors, in schema order."""
    return [f"hidden_{layer}" for layer in hidden_layers] + [f"{part}_{layer}" for layer in qkv_layers
                                                             for part in QKV_PARTS]


def vector_fields(name: str, encoding: str) -> list[pa.Field]:
    """The schema field(s) one vector column takes."""
    if encoding == "fp16":
        return [pa.field(name, pa.list_(pa.float16()))]  # (T*H,)
    if encoding == "int8":
        return [pa.field(name, pa.list_(pa.int8())), pa.field(name + SCALE_SUFFIX, pa.list_(pa.float32()))]
    raise ValueError(f"vector_encoding: expected one of {list(ENCODINGS)}, got {encoding!r}")


def encode(x: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """(T, H) float32 -> the stored arrays for one row: {"values": flat, "scale": (T,) for int8}."""
    x = np.asarray(x, dtype=np.float32)
    if encoding == "fp16":
        return {"values": x.astype(np.float16).reshape(-1)}
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return {"values": q.reshape(-1), "scale": scale}


def decode(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored values (..., H) (and scales (...,) for int8) -> float32 (..., H)."""
    out = np.asarray(values, dtype=np.float32)
    return out if scale is None else out * np.asarray(scale, dtype=np.float32)[..., None]


def reconstruct(x: np.ndarray, encoding: str) -> np.ndarray:
    """What a reader gets back for (N, H) float32 vectors stored with `encoding`."""
    stored = encode(x, encoding)
    return decode(stored["values"].reshape(x.shape), stored.get("scale"))


def fidelity_sums(x: np.ndarray, encoding: str) -> dict:
    """Sums over positions (rows of x, (N, H) float32) of the reconstruction's cosine and relative L2
    error, and the smallest cosine, in float64 (the manifest divides by the positions)."""
    x64 = np.asarray(x, dtype=np.float64)
    r64 = reconstruct(np.asarray(x, dtype=np.float32), encoding).astype(np.float64)
    norm_x, norm_r = np.linalg.norm(x64, axis=-1), np.linalg.norm(r64, axis=-1)
    live = norm_x > 0
    cos = np.where(live, (x64 * r64).sum(-1) / np.where(live, norm_x * np.maximum(norm_r, 1e-300), 1.0), 1.0)
    rel = np.where(live, np.linalg.norm(r64 - x64, axis=-1) / np.where(live, norm_x, 1.0), 0.0)
    return {"cosine": float(cos.sum()), "relative_error": float(rel.sum()),
            "min_cosine": float(cos.min()) if len(cos) else 1.0, "positions": int(len(cos))}


def merge_sums(a: dict | None, b: dict) -> dict:
    """Two fidelity_sums of one column added up."""
    if a is None:
        return dict(b)
    return {"cosine": a["cosine"] + b["cosine"], "relative_error": a["relative_error"] + b["relative_error"],
            "min_cosine": min(a["min_cosine"], b["min_cosine"]), "positions": a["positions"] + b["positions"]}


def merge_fidelity(parts: list[dict]) -> dict:
    """Per-shard {column: sums} -> {column: mean_cosine, mean_relative_error, min_cosine, positions}."""
    out: dict[str, dict] = {}
    for part in parts:
        for name, sums in part.items():
            out[name] = merge_sums(out.get(name), sums)
    return {name: {"mean_cosine": a["cosine"] / a["positions"] if a["positions"] else None,
                   "mean_relative_error": a["relative_error"] / a["positions"] if a["positions"] else None,
                   "min_cosine": a["min_cosine"], "positions": a["positions"]} for name, a in out.items()}
