"""Wikipedia XML dump reader: gensim parses and de-templates pages, we remove what it leaves behind.

`gensim.corpora.wikicorpus.filter_wiki` drops links, templates, refs and most tables but keeps
bold/italic quotes, `==Heading==` lines, list markers and image/gallery captions with their
`|alt=` / `|thumb` / `|220px` parameters. A teacher LM should see prose, so those are cleaned here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator
from xml.etree.ElementTree import ParseError

from kdlib.errors import ReaderError
from kdlib.text.readers.documents import Document
from kdlib.text.readers.lines import open_binary

_HEADING = re.compile(r"^(=+)\s*(.*?)\s*=+$")
_LIST_MARKERS = re.compile(r"^[*#:;]+\s*")
# One `|`-separated part of an image / gallery line that is a display parameter, not text.
_IMAGE_PARAM = re.compile(
    r"(alt|link|class|lang|page|upright|border|frame|frameless|thumb|thumbnail|left|right|center|"
    r"centre|none|baseline|middle|top|bottom)(=.*)?|\d+(x\d+)?px",
    re.IGNORECASE | re.DOTALL,
)
_IMAGE_FILE = re.compile(r"((file|image):)?.*\.(jpe?g|png|gif|svg|tiff?|webp|ogg|ogv|webm|pdf)",
                         re.IGNORECASE | re.DOTALL)
_LEADING_SIZE = re.compile(r"^\d+(x\d+)?px")
_STRAY_SIZE = re.compile(r"\b\d+(x\d+)?px\b")  # `Africa 30px` (flag icons, gallery sizes)
_STRAY_ALT = re.compile(r"\s*\balt=.*$")  # `Painted by alt=A bearded man ...`: alt text to line end
_BRACKETS = re.compile(r"\[\[|\]\]|\{\{|\}\}")
_QUOTES = re.compile(r"'{2,}")
_ONLY_TABLE_SYNTAX = re.compile(r"^[{}|!+\-=\s]*$")
_SPACES = re.compile(r"[ \t\u00a0]+")


def is_redirect(raw: str) -> bool:
    """MediaWiki redirects start with `#REDIRECT` in any letter case (`#redirect` occurs too)."""
    return raw.lstrip()[:9].lower() == "#redirect"


def _clean_line(line: str) -> str:
    line = line.strip()
    heading = _HEADING.match(line)
    if heading:
        line = heading.group(2)  # keep the heading text as its own line
    line = _LIST_MARKERS.sub("", line)
    if "|" in line:
        parts = [_LEADING_SIZE.sub("", p).strip() for p in line.split("|")]
        kept = [p for p in parts if p and not _IMAGE_PARAM.fullmatch(p) and not _IMAGE_FILE.fullmatch(p)]
        line = " ".join(kept)
    elif _IMAGE_PARAM.fullmatch(line) and line:
        line = ""  # a lone `220px` / `thumb` line left from an image
    line = _STRAY_SIZE.sub("", _STRAY_ALT.sub("", line))
    line = _BRACKETS.sub("", line)
    line = _QUOTES.sub("", line)
    if _ONLY_TABLE_SYNTAX.match(line):
        return ""
    return _SPACES.sub(" ", line).strip()


def clean_wiki_text(text: str) -> str:
    """Remove the markup `filter_wiki` leaves; paragraphs stay separated by exactly one blank line."""
    out: list[str] = []
    for raw_line in text.splitlines():
        line = _clean_line(raw_line)
        if line:
            out.append(line)
        elif out and out[-1] != "":
            out.append("")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out)


def read_wikipedia_xml(path: Path) -> Iterator[Document]:
    """Stream articles of a `pages-articles*.xml[.bz2]` dump as Documents with id `wiki:<page id>`.

    Redirects and pages with no text left after cleaning are skipped.
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # slow import: only when used

    count = 0
    try:
        with open_binary(path) as fh:
            for _title, raw, page_id in extract_pages(fh):
                if not raw or is_redirect(raw):
                    continue
                text = clean_wiki_text(filter_wiki(raw))
                if not text:
                    continue
                count += 1
                yield Document(id=f"wiki:{page_id}", text=text)
    except (OSError, EOFError) as exc:
        raise ReaderError(f"{path}: cannot read the Wikipedia dump: {exc}") from None
    except (ParseError, ValueError) as exc:  # bad XML (with line/column) or not a MediaWiki export
        raise ReaderError(f"{path}: not a valid Wikipedia XML dump: {exc}") from None
    if count == 0:
        raise ReaderError(f"{path}: no articles found (every page was empty or a redirect)")
