"""The pipeline's rows: stable ids and shard keys, and packing one hash group of units into rows.

Everything here is a function of its inputs, never of worker count or arrival order: Beam may
split and reorder work freely and the transfer set comes out the same. The packing itself is
`kdlib.packing`; this module only orders a group's units and names the rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdlib.packing import pack_documents


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
    text: str | None = None  # the (augmented) text itself, for task sets that keep it (keep_text)
    text_b: str | None = None  # its second segment (pair tasks)


def pack_group(items: list[TokenizedText], *, max_length: int, min_length: int, cls_id: int, sep_id: int) -> list[dict]:
    """Pack one group of units (one copy index): in unit-id order, the units of a document joined.

    Returns dicts with id, source_id, augmentation, input_ids (int32) and word_starts (bool); a
    row's id names the document its first token comes from and the row's index in the group.
    """
    items = sorted(items, key=lambda t: t.unit_id)
    if not items:
        return []
    documents: list[tuple[str, list[int], list[bool]]] = []
    for item in items:
        if not documents or documents[-1][0] != item.source_id:
            documents.append((item.source_id, [], []))
        documents[-1][1].extend(item.ids)
        documents[-1][2].extend(item.word_starts)
    augmentation = "original" if items[0].copy_index == 0 else f"copy{items[0].copy_index}"
    packed = pack_documents(((ids, starts) for _, ids, starts in documents), max_length=max_length,
                            min_length=min_length, cls_id=cls_id, sep_id=sep_id)
    return [{"id": row_id(documents[r.document][0], augmentation, r.index), "source_id": documents[r.document][0],
             "augmentation": augmentation, "input_ids": r.input_ids, "word_starts": r.word_starts} for r in packed]
