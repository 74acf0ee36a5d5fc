"""Corpus and task-set readers: every input format becomes a stream of Document / Example records
with ids that are identical on every run and machine."""
from kdlib.text.readers.corpus import CORPUS_KINDS, CorpusConfig, read_corpus
from kdlib.text.readers.documents import Document, Example
from kdlib.text.readers.normalize import normalize_text
from kdlib.text.readers.paths import DEFAULT_WIKI_NAME, gensim_test_data, resolve_path
from kdlib.text.readers.text import read_text
from kdlib.text.readers.wikipedia import clean_wiki_text, read_wikipedia_xml

__all__ = [
    "CORPUS_KINDS", "DEFAULT_WIKI_NAME",
    "CorpusConfig", "Document", "Example",
    "read_corpus", "read_text", "read_wikipedia_xml",
    "clean_wiki_text", "normalize_text", "gensim_test_data", "resolve_path",
]
