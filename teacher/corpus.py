"""The corpus both teacher preparations read, with its errors under the config field that names it.

A reader's error names the file and line (kdlib.text.readers) but not which field of which config pointed there;
here it becomes a ConfigError "<config>: field 'corpus.path': <file>: line <n>: ...". `check_corpus` reads the
first document before any work starts (a missing file, a pickle, a folder of no text, bad bytes at the top);
a bad line further down is refused when the preparation reads it (the masked-LM stage packing rows, the decoder
stage reading the whole corpus), before anything is written.
"""

from __future__ import annotations

from typing import Iterator

from kdlib.errors import ConfigError, ReaderError
from kdlib.text.readers import CorpusConfig, Document, read_corpus


def corpus_documents(corpus: CorpusConfig, source: str) -> Iterator[Document]:
    """`read_corpus(corpus)`, a ReaderError raised as the ConfigError of field corpus.path."""
    try:
        yield from read_corpus(corpus)
    except ReaderError as err:
        raise ConfigError(f"{source}: field 'corpus.path': {err}") from None


def check_corpus(corpus: CorpusConfig, source: str) -> None:
    """The corpus opens and yields a first document (reading stops there)."""
    next(corpus_documents(corpus, source))
