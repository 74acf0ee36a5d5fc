"""BERT masked-LM masking, written once: the data pipeline masks transfer-set rows with it and the
teacher preparation masks the sequences its head trains on.

Every draw comes from the numpy Generator the caller passes. The pipeline seeds one per row from
(seed, row id), so a row's mask does not depend on batching, worker count or order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np


@dataclass
class MaskingConfig:
    """BERT-style masking of packed rows: which tokens are predicted and what replaces them."""

    prob: float = 0.0  # fraction of tokens selected (0: no masking; BERT uses 0.15)
    whole_word: bool = True  # select whole words (all their word pieces together)
    mask_fraction: float = 0.8  # selected tokens replaced by [MASK]
    random_fraction: float = 0.1  # selected tokens replaced by a random token (the rest stay unchanged)
    rows: float = 1.0  # fraction of packed rows masked; the others stay plain text (representation targets)

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob < 1.0:
            raise ValueError(f"prob: expected a probability in [0, 1), got {self.prob}")
        if isinstance(self.rows, bool) or not 0.0 < self.rows <= 1.0:
            raise ValueError(f"rows: expected a fraction in (0, 1], got {self.rows!r}")
        for name in ("mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)}")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise ValueError(f"random_fraction: mask_fraction + random_fraction must be <= 1, got "
                             f"{self.mask_fraction} + {self.random_fraction}")


class MaskTokens(NamedTuple):
    """What masking needs from a tokenizer: the [MASK] id, the random-token range, the ids never selected."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MaskTokens":
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))))


def word_starts(word_ids: Sequence[Optional[int]]) -> tuple[bool, ...]:
    """True where a token begins a word, from a fast tokenizer's `word_ids()` (None: a special token)."""
    return tuple(w is not None and (j == 0 or word_ids[j - 1] != w) for j, w in enumerate(word_ids))


def mask_tokens(input_ids: Sequence[int], rng: np.random.Generator, cfg: MaskingConfig, tokens: MaskTokens,
                starts: Optional[Sequence[bool]] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one row: returns (masked ids, selected positions ascending, original ids there), int32.

    Special tokens are never selected. With `cfg.whole_word`, `starts` marks word beginnings and a
    word is selected with all its pieces; a special token, and a piece whose word began before a
    special token (a chunk boundary), start words of their own. A selected token becomes [MASK]
    with probability mask_fraction, a uniform random id with random_fraction, else stays.
    """
    ids = np.asarray(input_ids, dtype=np.int32)
    eligible = ~np.isin(ids, tokens.special_ids)
    if cfg.whole_word:
        if starts is None or len(starts) != len(ids):
            raise ValueError(f"starts: whole-word masking needs one word-start flag per token ({len(ids)})")
        new_word = np.asarray(starts, dtype=bool) | ~eligible  # a special token is its own "word"
        new_word[1:] |= ~eligible[:-1]  # and so is a piece cut off from its word by a chunk boundary
        word_index = np.cumsum(new_word) - 1
        chosen = (rng.random(int(word_index[-1]) + 1) < cfg.prob)[word_index] & eligible
    else:
        chosen = (rng.random(len(ids)) < cfg.prob) & eligible
    positions = np.flatnonzero(chosen).astype(np.int32)
    labels = ids[positions].copy()
    roll = rng.random(len(positions))
    random_tokens = rng.integers(0, tokens.vocab_size, len(positions), dtype=np.int32)
    masked = ids.copy()
    masked[positions[roll < cfg.mask_fraction]] = tokens.mask_id
    swap = (roll >= cfg.mask_fraction) & (roll < cfg.mask_fraction + cfg.random_fraction)
    masked[positions[swap]] = random_tokens[swap]
    return masked, positions, labels
