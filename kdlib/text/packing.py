"""Packing tokenized documents into rows, written once: the data pipeline packs each hash group of
documents with it and the teacher preparation packs its streamed corpus.

Two layouts, chosen by the teacher (`packing_for`):
- "cls" (masked LMs, BERT-style): documents are concatenated, each followed by [SEP], and the stream
  is cut every max_length - 1 tokens; each row is [CLS] + its chunk.
- "causal" (decoder LMs, GPT-style): no prefix; each document is followed by the tokenizer's eos token
  and the stream is cut every max_length tokens, so a row is its chunk.
Either way a row may start mid-document and end in the next one, so no token is wasted on padding,
and only the last chunk can be short; it is dropped below min_length. Attention across document
boundaries inside a row is not masked (the GPT-2 / Megatron default): the teacher's cached outputs
were computed on exactly the rows the student reads, so the two stay consistent.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

PACKINGS = ("cls", "causal")


class PackedRow(NamedTuple):
    """One packed row."""

    index: int  # the row's position in the packed stream (0, 1, ...)
    document: int  # index (in input order) of the document its first chunk token belongs to
    input_ids: np.ndarray  # int32: [CLS] + chunk ("cls"), or the chunk ("causal")
    word_starts: np.ndarray  # bool, one per id: True where a word begins (prefix and separators are False)
    start: int = 0  # stream position of the chunk's first token (the stream: each document, then its separator)


def packing_for(task: str) -> str:
    """The layout rows for a teacher with this head get: "causal" for a causal LM, else "cls"."""
    return "causal" if task == "causal_lm" else "cls"


def packing_ids(tokenizer, packing: str) -> tuple[Optional[int], Optional[int]]:
    """(prefix id, separator id) of a layout: ([CLS], [SEP]) for "cls", (None, eos) for "causal"."""
    if packing == "causal":
        return None, tokenizer.eos_token_id
    if packing == "cls":
        return tokenizer.cls_token_id, tokenizer.sep_token_id
    raise ValueError(f"packing: expected one of {', '.join(PACKINGS)}, got {packing!r}")


def pack_documents(documents: Iterable[tuple[Sequence[int], Sequence[bool]]], *, max_length: int, min_length: int,
                   cls_id: Optional[int], sep_id: int) -> Iterator[PackedRow]:
    """Rows from (token ids without special tokens, word-start flags) per document, lazily.

    `cls_id` is the prefix of every row ([CLS] for masked LMs) or None (causal LMs: no prefix, and
    `sep_id` is then the eos token). Lazy, so a caller may stop after the rows it needs without
    tokenizing the rest of a corpus.
    """
    prefix_ids, prefix_starts = ([], []) if cls_id is None else ([cls_id], [False])
    body = max_length - len(prefix_ids)
    ids: list[int] = []
    starts: list[bool] = []
    owners: list[int] = []
    index = 0
    consumed = 0  # stream positions before ids[0]

    def row(begin: int, end: int) -> PackedRow:
        return PackedRow(index, owners[begin], np.asarray(prefix_ids + ids[begin:end], dtype=np.int32),
                         np.asarray(prefix_starts + starts[begin:end], dtype=bool), consumed + begin)

    for doc, (doc_ids, doc_starts) in enumerate(documents):
        if len(doc_starts) != len(doc_ids):
            raise ValueError(f"document {doc}: {len(doc_ids)} token ids but {len(doc_starts)} word-start flags")
        ids.extend(doc_ids)
        ids.append(sep_id)
        starts.extend(doc_starts)
        starts.append(False)
        owners.extend([doc] * (len(doc_ids) + 1))
        cut = 0
        while len(ids) - cut >= body:
            yield row(cut, cut + body)
            cut += body
            index += 1
        del ids[:cut], starts[:cut], owners[:cut]
        consumed += cut
    if ids and len(ids) + len(prefix_ids) >= min_length:
        yield row(0, len(ids))
