"""Tokenizers trained offline with the `tokenizers` library on the Wikipedia sample, for decoder and
cross-tokenizer tests: a byte-level BPE (GPT-2 style: no unknown characters, leading spaces inside
tokens) and a lower-casing, accent-stripping WordPiece (BERT style: [UNK] for characters outside its
alphabet). Both are saved as plain transformers tokenizer folders, so `AutoTokenizer` loads them.

The training itself is the decoder teacher preparation's (teacher/tokenizer_training.py); here it runs on
the first 40 pages' lines. Deterministic for a given text and vocabulary size; each is trained once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kdlib.text.readers import CorpusConfig, read_corpus
from teacher.tokenizer_training import EOS, save_tokenizer, train_tokenizer

__all__ = ["EOS", "make_tokenizer", "wikipedia_lines"]


@functools.lru_cache(maxsize=1)
def wikipedia_lines(documents: int = 40) -> tuple[str, ...]:
    """Non-empty lines of the first `documents` pages of gensim's Wikipedia sample."""
    docs = read_corpus(CorpusConfig(kind="wikipedia_xml", max_documents=documents))
    return tuple(line for d in docs for line in d.text.split("\n") if line.strip())


@functools.lru_cache(maxsize=4)
def _trained(kind: str, vocab_size: int):
    # reproducible=False: the trainer's own WordPiece ids, which the tests were written against (they change from
    # process to process; teacher/tokenizer_training.py says why). The BPE is the same either way.
    return train_tokenizer(wikipedia_lines(), kind, vocab_size, reproducible=False)


def make_tokenizer(folder: str | Path, kind: str = "bpe", vocab_size: int = 512):
    """Train (once per process) and save a fast tokenizer into `folder`; returns the transformers tokenizer.

    bpe: eos = bos = pad = <|endoftext|> (GPT-2's convention); wordpiece: BERT's special tokens, with
    [SEP] as the end-of-document token and [CLS] as bos."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return save_tokenizer(folder, _trained(kind, vocab_size), kind)
