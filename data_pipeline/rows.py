"""The pipeline's rows: stable ids and shard keys, and packing one hash group of units into rows.

Everything here is a function of its inputs, never of worker count or arrival order: Beam may
split and reorder work freely and the transfer set comes out the same. The packing itself is
`kdlib.text.packing`; this module orders a group's units, names the rows and (char_offsets) gives each
row its text and the character span of every token in it, for students with another tokenizer.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from kdlib.text.packing import PackedRow, pack_documents


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
    spans: tuple[tuple[int, int], ...] | None = None  # char_offsets: each token's (start, end) character span in text


def pack_group(items: list[TokenizedText], *, max_length: int, min_length: int, cls_id: Optional[int], sep_id: int,
               char_offsets: bool = False) -> list[dict]:
    """Pack one group of units (one copy index): in unit-id order, the units of a document joined.

    Returns dicts with id, source_id, augmentation, input_ids (int32) and word_starts (bool); a
    row's id names the document its first token comes from and the row's index in the group.
    `cls_id` None packs causally (kdlib/text/packing.py: no prefix, `sep_id` the eos). With `char_offsets`
    (units carry text and spans) each row also gets text, char_offsets and text_breaks (`row_text`).
    """
    items = sorted(items, key=lambda t: t.unit_id)
    if not items:
        return []
    documents: list[_Document] = []
    for item in items:
        if not documents or documents[-1].source_id != item.source_id:
            documents.append(_Document(item.source_id))
        documents[-1].add(item, char_offsets)
    augmentation = "original" if items[0].copy_index == 0 else f"copy{items[0].copy_index}"
    packed = pack_documents(((d.ids, d.starts) for d in documents), max_length=max_length,
                            min_length=min_length, cls_id=cls_id, sep_id=sep_id)
    stream_starts = np.cumsum([0] + [len(d.ids) + 1 for d in documents]).tolist()  # each document + separator
    rows = []
    for r in packed:
        row = {"id": row_id(documents[r.document].source_id, augmentation, r.index),
               "source_id": documents[r.document].source_id, "augmentation": augmentation,
               "input_ids": r.input_ids, "word_starts": r.word_starts}
        if char_offsets:
            row.update(row_text(r, documents, stream_starts, prefix=cls_id is not None))
        rows.append(row)
    return rows


class _Document:
    """One document of a group: its units' ids and flags joined, and (char_offsets) their texts joined by
    "\n" with each token's span shifted to index into the joined text."""

    def __init__(self, source_id: str):
        self.source_id = source_id
        self.ids: list[int] = []
        self.starts: list[bool] = []
        self.texts: list[str] = []
        self.spans: list[tuple[int, int]] = []
        self._length = -1  # characters of the joined text so far, less the "\n" the next unit brings

    def add(self, item: TokenizedText, char_offsets: bool) -> None:
        self.ids.extend(item.ids)
        self.starts.extend(item.word_starts)
        if not char_offsets:
            return
        if item.text is None or item.spans is None or len(item.spans) != len(item.ids):
            raise ValueError(f"unit {item.unit_id}: char_offsets needs its text and one span per token")
        shift = self._length + 1
        self.spans.extend((a + shift, b + shift) for a, b in item.spans)
        self.texts.append(item.text)
        self._length = shift + len(item.text)

    @functools.cached_property
    def text(self) -> str:  # (read once every unit is added)
        return "\n".join(self.texts)


def row_text(row: PackedRow, documents: list[_Document], stream_starts: list[int], *, prefix: bool) -> dict:
    """A packed row's text, each token's character span in it, and where each document piece after the first
    starts.

    Per document piece in the row (its tokens there, in order), the document's text from the piece's first
    character to its last, the pieces joined by "\n". Special tokens (the prefix, separators) get the empty
    span at the start of the piece that follows them, or at the end of the text when none does.
    """
    n = len(row.input_ids) - int(prefix)
    where: list[Optional[tuple[int, int]]] = [None] * int(prefix)  # (document, token index), None: special
    for p in range(row.start, row.start + n):
        d = bisect.bisect_right(stream_starts, p) - 1
        j = p - stream_starts[d]
        where.append(None if j == len(documents[d].ids) else (d, j))
    pieces: list[list[int]] = []  # [document, first char, end char]
    piece_of: list[int] = []
    for token in where:
        if token is not None:
            d, j = token
            a, b = documents[d].spans[j]
            if not pieces or pieces[-1][0] != d:
                pieces.append([d, a, b])
            pieces[-1][1], pieces[-1][2] = min(pieces[-1][1], a), max(pieces[-1][2], b)
        piece_of.append(len(pieces) - 1)
    texts = [documents[d].text[a:b] for d, a, b in pieces]
    bases = np.cumsum([0] + [len(t) + 1 for t in texts]).tolist()
    text = "\n".join(texts)
    offsets = np.zeros((len(where), 2), dtype=np.int32)
    following = len(text)  # the start of the next piece, walking backwards
    for i in range(len(where) - 1, -1, -1):
        if where[i] is None:
            offsets[i] = following
            continue
        d, j = where[i]
        k = piece_of[i]
        a, b = documents[d].spans[j]
        offsets[i] = (a - pieces[k][1] + bases[k], b - pieces[k][1] + bases[k])
        following = bases[k]
    return {"text": text, "char_offsets": offsets.reshape(-1),
            "text_breaks": np.asarray(bases[1:len(texts)], dtype=np.int32)}
