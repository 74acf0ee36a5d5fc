"""Corpus and task-set readers: every input format becomes a stream of Document / Example records
with ids that are identical on every run and machine."""
from kdlib.readers.corpus import CORPUS_KINDS, CorpusConfig, read_corpus
from kdlib.readers.documents import Document, Example
from kdlib.readers.normalize import normalize_text
from kdlib.readers.paths import DEFAULT_WIKI_NAME, gensim_test_data, resolve_path
from kdlib.readers.tasks import TASK_KINDS, TaskConfig, read_fasttext, read_task
from kdlib.readers.text import read_text
from kdlib.readers.wikipedia import clean_wiki_text, read_wikipedia_xml

__all__ = [
    "CORPUS_KINDS", "TASK_KINDS", "DEFAULT_WIKI_NAME",
    "CorpusConfig", "TaskConfig", "Document", "Example",
    "read_corpus", "read_task", "read_text", "read_fasttext", "read_wikipedia_xml",
    "clean_wiki_text", "normalize_text", "gensim_test_data", "resolve_path",
]
