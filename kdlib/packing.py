"""Packing tokenized documents into [CLS] + chunk rows, written once: the data pipeline packs each
hash group of documents with it and the teacher preparation packs its streamed corpus.

Documents are concatenated, each followed by [SEP], and the stream is cut every max_length - 1
tokens; each row is [CLS] + its chunk. A row may start mid-document and end in the next one, so no
token is wasted on padding. Only the last chunk can be short; it is dropped below min_length.
"""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np


class PackedRow(NamedTuple):
    """One packed row."""

    index: int  # the row's position in the packed stream (0, 1, ...)
    document: int  # index (in input order) of the document its first chunk token belongs to
    input_ids: np.ndarray  # int32: [CLS] + chunk
    word_starts: np.ndarray  # bool, one per id: True where a word begins ([CLS] and [SEP] are False)


def pack_documents(documents: Iterable[tuple[Sequence[int], Sequence[bool]]], *, max_length: int, min_length: int,
                   cls_id: int, sep_id: int) -> Iterator[PackedRow]:
    """Rows from (token ids without special tokens, word-start flags) per document, lazily.

    Lazy, so a caller may stop after the rows it needs without tokenizing the rest of a corpus.
    """
    body = max_length - 1
    ids: list[int] = []
    starts: list[bool] = []
    owners: list[int] = []
    index = 0

    def row(begin: int, end: int) -> PackedRow:
        return PackedRow(index, owners[begin], np.asarray([cls_id] + ids[begin:end], dtype=np.int32),
                         np.asarray([False] + starts[begin:end], dtype=bool))

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
    if ids and len(ids) + 1 >= min_length:
        yield row(0, len(ids))
