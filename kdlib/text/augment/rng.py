"""Counter-based random numbers: a draw is a pure function of (seed, example id, copy, stream, index).

Each copy gets a 64-bit key from blake2b (never Python's salted hash(), never global numpy state),
and every uniform is splitmix64(key, stream, counter). So a draw does not depend on how many draws
came before it, on batch composition, on worker count or on order, and the batch path (one numpy
call over every word of a batch) and the one-example path give bit-identical numbers.
"""
from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_INV_2_53 = 1.0 / (1 << 53)

# Stream numbers: one independent sequence per kind of decision.
MASK, MLM, MLM_PICK, POS, POS_PICK, NGRAM = 1, 2, 3, 4, 5, 6


def copy_key(seed: int, example_id: object, copy_index: int) -> int:
    """The 64-bit key of one augmented copy: blake2b of f"{seed}:{example_id}:{copy_index}".

    Ids are formatted with str(), so the int 7 and the string "7" give the same draws.
    """
    digest = hashlib.blake2b(f"{seed}:{example_id}:{copy_index}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def uniforms(keys: np.ndarray, counters: np.ndarray, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), elementwise for (keys[i], stream, counters[i]); 53 random bits each."""
    keys = np.asarray(keys, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    sub = _mix(keys + np.uint64((stream * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)))
    z = _mix(sub + (counters + np.uint64(1)) * _GOLDEN)
    return (z >> _S11).astype(np.float64) * _INV_2_53


def uniform_scalar(key: int, counter: int, stream: int) -> float:
    """Pure-Python twin of `uniforms` for one value (used by tests as a hand computation)."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    sub = mix((key + stream * 0x9E3779B97F4A7C15) & mask)
    z = mix((sub + (counter + 1) * 0x9E3779B97F4A7C15) & mask)
    return (z >> 11) * _INV_2_53
