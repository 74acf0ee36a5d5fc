"""Plain-text corpora: one document per file, per line, or per blank-line-separated paragraph."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from kdlib.errors import ReaderError
from kdlib.text.readers.documents import Document
from kdlib.text.readers.lines import decode_whole, iter_lines, open_binary
from kdlib.text.readers.paths import refuse_pickle

TEXT_MODES = ("file", "line", "blank_line")


def list_text_files(path: Path) -> list[tuple[Path, str]]:
    """(file, id prefix) pairs: a file is its own base name; a folder gives its files, sorted,
    named by path relative to the folder (hidden files skipped) so ids match on every machine."""
    if path.is_file():
        return [(path, path.name)]
    if not path.is_dir():
        raise ReaderError(f"{path}: no such file or directory")
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    return [(p, p.relative_to(path).as_posix()) for p in files]


def _per_line(path: Path, prefix: str, encoding: str) -> Iterator[Document]:
    for lineno, line in iter_lines(path, encoding):
        text = line.strip()
        if text:
            yield Document(id=f"{prefix}:{lineno}", text=text)


def _per_paragraph(path: Path, prefix: str, encoding: str) -> Iterator[Document]:
    # A paragraph's id is the line number of its first line.
    start, buf = 0, []
    for lineno, line in iter_lines(path, encoding):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line.strip())
        elif buf:
            yield Document(id=f"{prefix}:{start}", text="\n".join(buf))
            buf = []
    if buf:
        yield Document(id=f"{prefix}:{start}", text="\n".join(buf))


def _whole_file(path: Path, prefix: str, encoding: str) -> Iterator[Document]:
    # One document is held in memory anyway, so reading the file at once costs nothing extra.
    with open_binary(path) as fh:
        data = fh.read()
    text = decode_whole(data, path, encoding).strip()
    if text:
        yield Document(id=prefix, text=text)


def read_text(path: Path, mode: str = "line", encoding: str = "utf-8") -> Iterator[Document]:
    """Stream Documents from a text file or a folder of text files (`.gz`/`.bz2` decompressed).

    mode: `line` = one document per non-empty line (id `<name>:<line>`); `blank_line` = paragraphs
    separated by blank lines (id `<name>:<first line>`); `file` = each file is one document (id `<name>`).
    """
    per_file = {"line": _per_line, "blank_line": _per_paragraph, "file": _whole_file}.get(mode)
    if per_file is None:
        raise ValueError(f"text_mode: expected one of {TEXT_MODES}, got {mode!r}")
    files = list_text_files(path)
    count = 0
    for file, prefix in files:
        refuse_pickle(file)
        for doc in per_file(file, prefix, encoding):
            count += 1
            yield doc
    if count == 0:
        what = "no files" if not files else "no non-empty text"
        raise ReaderError(f"{path}: empty input: {what} (expected at least one document, mode={mode!r})")
