"""Held-out text: the documents of the transfer set's own corpus that come after the ones it was built from.

A corpus transfer set records its corpus config in manifest.json; `corpus.max_documents = N` means the
pipeline read the first N documents of that stream (`kdlib.text.readers.read_corpus` stops after N), so the
documents from N + 1 on were never seen by a student trained on it. They are tokenized and packed exactly
as the pipeline packs ([CLS] + chunks of max_length - 1 tokens, documents separated by [SEP]) and the first
`max_sequences` rows are kept: the same text on every run. Masks come from the project's one masking
function (kdlib.text.masking), row r seeded with default_rng([seed, r]), so every model sees the same masks.

The selection is refused, never guessed, when it could overlap what was trained on: a transfer set built
without max_documents (every document may be in it), one built from a task set, a held-out document
whose id occurs among the transfer set's row source ids, or a transfer set whose source ids are not
among the first N documents read here (then this is not the corpus it was built from).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlib.cache import TransferSet, read_manifest
from kdlib.config import from_dict, to_dict
from kdlib.errors import CacheError, ReaderError
from kdlib.text.masking import MaskingConfig, MaskTokens, mask_tokens, word_starts
from kdlib.text.packing import pack_documents
from kdlib.text.readers import CorpusConfig, normalize_text, read_corpus, resolve_path
from kdlib.text.tokenize import tokenize_texts


@dataclass
class HeldOut:
    """The held-out sequences, their masks, and where they came from (for evaluation.json)."""

    transfer_set: str  # the transfer-set folder that fixed the selection
    corpus: dict  # its corpus config, as read (max_documents removed)
    skipped_documents: int  # the transfer set's max_documents: documents 1..N were (or may have been) seen
    article_ids: list[str]  # the held-out documents the sequences come from, in order
    texts: list[str]  # their normalised texts (a model's tokenizer must encode them as the teacher's does)
    token_ids: list[list[int]]  # the teacher tokenizer's ids of each text, no special tokens
    input_ids: list[np.ndarray]  # (T,) int32 per sequence, unmasked
    masked_ids: list[np.ndarray]  # (T,) int32 per sequence, masked
    positions: list[np.ndarray]  # selected positions per sequence, ascending
    settings: dict  # max_length, max_sequences, min_length, mask_prob, seed

    @property
    def masked_positions(self) -> int:
        return int(sum(len(p) for p in self.positions))

    def summary(self) -> dict:
        return {"transfer_set": self.transfer_set, "corpus": self.corpus,
                "skipped_documents": self.skipped_documents, "article_ids": list(self.article_ids),
                "articles": len(self.article_ids), "sequences": len(self.input_ids),
                "tokens": int(sum(len(r) for r in self.input_ids)), "masked_positions": self.masked_positions,
                **self.settings, "masking": "BERT 80/10/10 whole-word (kdlib.text.masking), row r: default_rng([seed, r])"}


def corpus_of(transfer_set: str | Path) -> tuple[CorpusConfig, int]:
    """The transfer set's corpus (every document, max_documents removed) and its max_documents N.

    CacheError when no document is held out or the corpus cannot be read from here; reads no document."""
    manifest = read_manifest(transfer_set)
    where = f"{transfer_set}/manifest.json"
    corpus = manifest.config.get("corpus") if isinstance(manifest.config, dict) else None
    if not isinstance(corpus, dict):
        raise CacheError(f"{where}: records no corpus (config.corpus); a task or hand-made transfer set has no "
                         "held-out corpus documents. Point transfer_set at a corpus transfer set, or set "
                         "heldout.enabled: false")
    limit = corpus.get("max_documents")
    if limit is None:
        raise CacheError(f"{where}: config.corpus.max_documents is null: the transfer set was built from every "
                         "document of its corpus, so no document is held out. Rebuild it with "
                         "corpus.max_documents set, or set heldout.enabled: false")
    cfg = from_dict(CorpusConfig, {**corpus, "max_documents": None}, f"{where} (config.corpus)")
    if cfg.path != "default":
        try:
            resolve_path(cfg.path)
        except ReaderError as err:
            raise CacheError(f"{where}: the transfer set's corpus cannot be read from here ({err}); run from the "
                             "folder the pipeline ran in, or set heldout.enabled: false") from None
    return cfg, int(limit)


def transfer_source_ids(transfer_set: str | Path) -> set[str]:
    """Every row's source_id (the document it starts in), read from the shards (digests checked on read)."""
    rows = TransferSet(transfer_set, verify="lazy", columns=["source_id"])
    return {str(rows.row(i)["source_id"]) for i in range(len(rows))}


def select_heldout(transfer_set: str | Path, tokenizer, *, max_length: int, max_sequences: int, min_length: int,
                   mask_prob: float, seed: int) -> HeldOut:
    """The first `max_sequences` packed rows of the documents after the transfer set's, masked; see the module doc."""
    corpus_cfg, limit = corpus_of(transfer_set)
    where = f"{transfer_set}/manifest.json"
    seen = transfer_source_ids(transfer_set)
    documents = read_corpus(corpus_cfg)
    first = {doc.id for doc in itertools.islice(documents, limit)}
    article_ids: list[str] = []
    texts: list[str] = []
    token_ids: list[list[int]] = []

    def tokenized():  # lazily: packing stops reading the corpus once it has max_sequences rows
        for doc in documents:
            text = normalize_text(doc.text)
            enc = tokenize_texts(tokenizer, [text], task=False, max_length=None)
            article_ids.append(doc.id)
            texts.append(text)
            token_ids.append(list(enc["input_ids"][0]))
            yield enc["input_ids"][0], word_starts(enc.word_ids(0))

    rows = list(itertools.islice(pack_documents(tokenized(), max_length=max_length, min_length=min_length,
                                                cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id),
                                 max_sequences))
    overlap = sorted(set(article_ids) & seen)
    if overlap:
        raise CacheError(f"{transfer_set}: held-out document(s) {', '.join(overlap[:3])} occur among the transfer "
                         "set's row source ids, so they were seen in training; refusing to score on them")
    strangers = sorted(seen - first)
    if strangers:
        raise CacheError(f"{transfer_set}: its rows name source ids that are not among the first {limit} documents "
                         f"of the corpus read here (e.g. {', '.join(strangers[:3])}); this is not the corpus the "
                         "transfer set was built from, so the held-out documents cannot be known")
    if not rows:
        raise CacheError(f"{where}: the corpus has no text after its first {limit} documents (the ones the transfer "
                         "set was built from), so there is nothing held out to score on")
    masking = MaskingConfig(prob=mask_prob, whole_word=True)
    tokens = MaskTokens.from_tokenizer(tokenizer)
    input_ids, masked_ids, positions = [], [], []
    for r, row in enumerate(rows):
        masked, selected, _ = mask_tokens(row.input_ids, np.random.default_rng([seed, r]), masking, tokens,
                                          row.word_starts)
        input_ids.append(row.input_ids)
        masked_ids.append(masked)
        positions.append(selected)
    settings = {"max_length": max_length, "max_sequences": max_sequences, "min_length": min_length,
                "mask_prob": mask_prob, "seed": seed}
    return HeldOut(str(transfer_set), to_dict(corpus_cfg), limit, article_ids, texts, token_ids, input_ids,
                   masked_ids, positions, settings)


def same_tokens(tokenizer, heldout: HeldOut, reference) -> bool:
    """Whether `tokenizer` turns the held-out texts into the teacher's ids, with the same special-token ids:
    only then are token-level comparisons (and the same input ids) meaningful for both models."""
    specials = ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id")
    if any(getattr(tokenizer, s) != getattr(reference, s) for s in specials):
        return False
    enc = tokenize_texts(tokenizer, heldout.texts, task=False, max_length=None)
    return [list(ids) for ids in enc["input_ids"]] == heldout.token_ids
