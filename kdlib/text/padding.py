"""Right-padding of variable-length rows into batch tensors: the one implementation.

The data pipeline pads token ids for the teacher's forward and the transfer-set reader pads every
per-position column for training; both use these functions, so a row is padded the same way in
both places. Rows are concatenated once and scattered into the batch with a (B, T) boolean mask,
so the cost is a few numpy calls per batch, not a Python loop over rows and positions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def row_lengths(rows: Sequence) -> np.ndarray:
    """(B,) int64 lengths of the rows (anything with len())."""
    return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def length_mask(lengths: np.ndarray, T: int) -> np.ndarray:
    """(B, T) bool: True at the first lengths[i] positions of row i."""
    return np.arange(T) < np.asarray(lengths)[:, None]


def pad_flat(rows: Sequence, lengths: np.ndarray, T: int, *, dtype, fill=0, width: Optional[int] = None,
             name: str = "values") -> np.ndarray:
    """Rows of lengths[i] positions (x `width` values each, stored flat) -> (B, T) or (B, T, width) array.

    Values beyond a row's length are `fill`. A row whose size is not lengths[i] * width is an error
    naming the column, never silently shifted into its neighbour.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    per = 1 if width is None else int(width)
    sizes = row_lengths(rows)
    if not np.array_equal(sizes, lengths * per):
        i = int(np.flatnonzero(sizes != lengths * per)[0])
        raise ValueError(f"{name}: row {i} holds {sizes[i]} values, expected {lengths[i]} positions x {per}")
    shape = (len(lengths), T) if width is None else (len(lengths), T, per)
    out = np.full(shape, fill, dtype=dtype)
    if len(rows):
        flat = np.concatenate([np.asarray(r).reshape(-1) for r in rows], dtype=dtype, casting="unsafe")
        out[length_mask(lengths, T)] = flat if width is None else flat.reshape(-1, per)
    return out


def pad_sequences(sequences: Sequence, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) long token ids right-padded with `pad_id`, and the (B, T) long attention mask; T = longest row."""
    lengths = row_lengths(sequences)
    T = int(lengths.max())
    ids = pad_flat(sequences, lengths, T, dtype=np.int64, fill=pad_id, name="input_ids")
    return torch.from_numpy(ids), torch.from_numpy(length_mask(lengths, T).astype(np.int64))
