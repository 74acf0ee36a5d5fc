"""Pure functions for rows: stable ids, packing documents into sequences, and MLM masking.

Everything here is a function of its inputs and a seed, never of worker count or arrival order:
Beam may split and reorder work freely and the transfer set comes out the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def stable_hash(text: str) -> int:
    """64-bit hash that is the same on every machine and run (unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def row_id(source_id: str, augmentation: str, index: int) -> str:
    """A row's stable id: a hash of where it starts, how it was augmented, and its index there."""
    return hashlib.blake2b(f"{source_id}|{augmentation}|{index}".encode("utf-8"), digest_size=12).hexdigest()


def shard_of(rid: str, num_shards: int) -> int:
    return int(rid[:12], 16) % num_shards


@dataclass(frozen=True)
class TokenizedText:
    """One text after the teacher's tokenizer, before packing (corpus) or as one row (task)."""

    unit_id: str  # sortable id of the unit (document, line of a document, or example)
    source_id: str  # the document / example it came from
    copy_index: int  # 0 = original, 1.. = augmented copies
    kind: str  # augmentation kinds applied ("original" for copy 0)
    ids: tuple[int, ...]  # token ids without special tokens (corpus) or with them (task)
    word_starts: tuple[bool, ...]  # True where a token begins a word (for whole-word masking)
    label: str | None = None


def pack_group(items: list[TokenizedText], *, max_length: int, min_length: int, cls_id: int, sep_id: int) -> list[dict]:
    """Concatenate units in id order, each document followed by [SEP], and cut [CLS]+chunk rows.

    Returns dicts with id, source_id, augmentation, input_ids (int32) and word_starts (bool).
    """
    items = sorted(items, key=lambda t: t.unit_id)
    ids: list[int] = []
    starts: list[bool] = []
    owners: list[str] = []
    for pos, item in enumerate(items):
        ids.extend(item.ids)
        starts.extend(item.word_starts)
        owners.extend([item.source_id] * len(item.ids))
        last_of_doc = pos + 1 == len(items) or items[pos + 1].source_id != item.source_id
        if last_of_doc:
            ids.append(sep_id)
            starts.append(False)
            owners.append(item.source_id)
    body = max_length - 1
    rows = []
    if not items:
        return rows
    augmentation = "original" if items[0].copy_index == 0 else f"copy{items[0].copy_index}"
    for index, start in enumerate(range(0, len(ids), body)):
        chunk = ids[start:start + body]
        if len(chunk) + 1 < min_length:
            continue
        source = owners[start]
        rows.append({
            "id": row_id(source, augmentation, index),
            "source_id": source,
            "augmentation": augmentation,
            "input_ids": np.asarray([cls_id] + chunk, dtype=np.int32),
            "word_starts": np.asarray([False] + starts[start:start + body], dtype=bool),
        })
    return rows


def mask_row(input_ids: np.ndarray, word_starts: np.ndarray, *, seed: int, rid: str, prob: float,
             whole_word: bool, mask_fraction: float, random_fraction: float, mask_id: int, vocab_size: int,
             special_ids: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking, seeded by (seed, row id): returns (masked ids, positions, original ids there)."""
    rng = np.random.default_rng(stable_hash(f"{seed}:{rid}"))
    ids = np.asarray(input_ids, dtype=np.int32)
    eligible = ~np.isin(ids, list(special_ids))
    if whole_word:
        new_word = np.asarray(word_starts, dtype=bool) | ~eligible  # a special token is its own "word"
        new_word[1:] |= ~eligible[:-1]  # and so is a piece cut off from its word by a chunk boundary
        word_index = np.cumsum(new_word) - 1
        chosen_words = rng.random(int(word_index[-1]) + 1) < prob
        chosen = chosen_words[word_index] & eligible
    else:
        chosen = (rng.random(len(ids)) < prob) & eligible
    positions = np.flatnonzero(chosen).astype(np.int32)
    labels = ids[positions].copy()
    roll = rng.random(len(positions))
    random_tokens = rng.integers(0, vocab_size, len(positions), dtype=np.int32)
    masked = ids.copy()
    masked[positions[roll < mask_fraction]] = mask_id
    swap = (roll >= mask_fraction) & (roll < mask_fraction + random_fraction)
    masked[positions[swap]] = random_tokens[swap]
    return masked, positions, labels
