"""Fingerprints of teachers and tokenizers: sha256 over the files that define them.

A transfer set or checkpoint records these so that a consumer can refuse outputs made by another
model. Hashing a 90 MB file on every start would be slow, so each file's digest is cached by
(absolute path, size, mtime_ns, inode) in a small JSON file: touching a file recomputes its digest
(and gets the same value), changing a byte changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kdlib.errors import ModelLoadError
from kdlib.runtime.io import atomic_write_text, sha256_file

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
MASKED_LM = "masked_lm"  # a general student's subfolder: its whole masked-LM model beside the encoder (kdlib.students.portable)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def _cache_path() -> Path:
    root = os.environ.get("KDLIB_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kdlib")
    return Path(root) / "file_digests.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of one file, recomputed only when its size, mtime or inode changed."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = _load_cache()
    if key in cache:
        return cache[key]
    digest = sha256_file(path)
    cache = {k: v for k, v in _load_cache().items() if not k.startswith(f"{path}|")}
    cache[key] = digest
    try:
        atomic_write_text(_cache_path(), json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only home only costs a recomputation next time
    return digest


def _combine(folder: Path, files: list[Path]) -> str:
    """One digest over (relative name, file digest) pairs, so renames and content both count."""
    outer = hashlib.sha256()
    for f in sorted(files):
        outer.update(f"{f.relative_to(folder).as_posix()}:{file_digest(f)}\n".encode())
    return outer.hexdigest()


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the weight files and config.json of a model folder, and of its masked_lm/ subfolder when it has
    one (the head a teacher's logits come from is part of what made them)."""
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        raise ModelLoadError(f"{folder}: no safetensors weight files to fingerprint")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder}: no config.json to fingerprint")
    head = folder / MASKED_LM
    if (head / "config.json").is_file():
        files += _weight_files(head) + [head / "config.json"]
    return _combine(folder, files + [config])


def _weight_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})


def tokenizer_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the tokenizer files present in a folder."""
    folder = Path(folder)
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        raise ModelLoadError(f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return _combine(folder, files)


def short(fingerprint: str) -> str:
    """The first 12 hex digits, for logs and messages."""
    return fingerprint[:12]
