"""Typed config of word-level augmentation (Tang et al. 2019; TinyBERT's MLM variant)."""
from __future__ import annotations

import math
from dataclasses import dataclass


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_prob(name: str, value: object) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and not math.isnan(value)
        and 0.0 <= value <= 1.0
    )
    if not ok:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")


@dataclass
class AugmentConfig:
    """How many augmented copies to make per example and how likely each word-level operation is."""

    copies: int = 0  # augmented copies per example (the original is always kept in addition)
    seed: int = 0  # base seed; output is a pure function of (seed, example id, copy index)
    mask_prob: float = 0.1  # per-word probability of replacing a whole word with the mask token
    pos_swap_prob: float = 0.1  # per-word probability of a same-POS swap from the corpus vocabulary
    ngram_prob: float = 0.25  # per-copy probability of keeping only a random contiguous n-gram window
    ngram_min: int = 1  # smallest n for n-gram sampling (Tang et al. use 1..5)
    ngram_max: int = 5  # largest n for n-gram sampling
    mlm_replace_prob: float = 0.0  # per-word probability of a teacher MLM top-k replacement (TinyBERT)
    mlm_top_k: int = 15  # how many MLM predictions to ask the teacher for at each masked word
    mask_token: str = "[MASK]"  # the teacher tokenizer's mask token, written in place of masked words

    def __post_init__(self) -> None:
        _check_int("copies", self.copies, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        for name in ("mask_prob", "pos_swap_prob", "ngram_prob", "mlm_replace_prob"):
            _check_prob(name, getattr(self, name))
        _check_int("ngram_min", self.ngram_min, 1)
        _check_int("ngram_max", self.ngram_max, 1)
        if self.ngram_min > self.ngram_max:
            raise ValueError(
                f"ngram_min: expected <= ngram_max ({self.ngram_max}), got {self.ngram_min!r}"
            )
        _check_int("mlm_top_k", self.mlm_top_k, 1)
        if not isinstance(self.mask_token, str) or not self.mask_token or self.mask_token != self.mask_token.strip():
            raise ValueError(
                f"mask_token: expected a non-empty string without surrounding spaces, got {self.mask_token!r}"
            )
        if any(ch.isspace() for ch in self.mask_token):
            raise ValueError(f"mask_token: expected no whitespace inside, got {self.mask_token!r}")
