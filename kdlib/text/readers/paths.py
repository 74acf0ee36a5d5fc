"""Where input files come from: plain paths, or `gensim:<name>` files shipped in gensim's test data.

gensim ships small real corpora (a Wikipedia dump sample, the Lee corpus, Pang & Lee polarity)
that make the pipeline runnable offline. Some of its test files are pickles: those are refused,
because unpickling runs arbitrary code.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from kdlib.errors import ReaderError

GENSIM_PREFIX = "gensim:"
DEFAULT_WIKI_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".p")


def gensim_test_dir() -> Path:
    """gensim's `test/test_data` folder, found without importing gensim (importing it is slow)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ReaderError("gensim is not installed: the `gensim:` paths and the default Wikipedia "
                          "sample need it (pip install -r requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def gensim_test_data(name: str) -> Path:
    """Path of gensim test-data file `name` (e.g. `lee_background.cor`); must exist and stay inside."""
    root = gensim_test_dir().resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise ReaderError(f"gensim:{name}: expected a file inside {root}, got a path outside it")
    if not path.is_file():
        raise ReaderError(f"gensim:{name}: no such file in gensim test data ({root})")
    return path


def __getattr__(attr: str):
    # DEFAULT_WIKI_DUMP is computed on first use so importing kdlib.text.readers never needs gensim.
    if attr == "DEFAULT_WIKI_DUMP":
        return gensim_test_data(DEFAULT_WIKI_NAME)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def resolve_path(path: str | Path) -> Path:
    """Turn a config path (`gensim:<name>` or a filesystem path) into an existing Path."""
    text = str(path)
    if text.startswith(GENSIM_PREFIX):
        resolved = gensim_test_data(text[len(GENSIM_PREFIX):])
    else:
        resolved = Path(text).expanduser()
        if not resolved.exists():
            raise ReaderError(f"{resolved}: no such file or directory")
    if resolved.is_file():
        refuse_pickle(resolved)
    return resolved


def refuse_pickle(path: Path) -> None:
    """Raise if `path` is (by name or by its first bytes) a Python pickle: we never unpickle."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ReaderError(f"{path}: refusing to read a pickle file (unpickling can run code)")
    with open(path, "rb") as fh:
        head = fh.read(2)
    # Pickle protocols 2..5 start with the PROTO opcode 0x80 followed by the protocol number.
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ReaderError(f"{path}: refusing to read a pickle file (unpickling can run code)")
