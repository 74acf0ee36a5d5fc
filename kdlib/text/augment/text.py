"""A small deterministic word tokenizer whose words map back to text (spaces are remembered)."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

# A word: letters/digits with inner apostrophes or hyphens ("don't", "south-west"); otherwise one
# punctuation character. No capturing groups, so findall returns plain strings (no tuples).
_WORD = r"\w+(?:['\u2019\-]\w+)*|[^\w\s]"
_ALNUM = re.compile(r"[^\W_]")


@lru_cache(maxsize=16)
def _patterns(mask_token: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(words, whitespace-before-each-word) patterns; the mask token first so it stays one word."""
    word = f"{re.escape(mask_token)}|{_WORD}"
    # "(\s?)" before a word captures " " exactly when whitespace precedes it: every non-space
    # character belongs to some word, so the scan reaches the last space before each word.
    return re.compile(word), re.compile(f"(\\s?)(?:{word})")


class Tokens(NamedTuple):
    """Words of one text and, per word, whether whitespace preceded it in the text."""

    words: tuple[str, ...]  # the words, in order, never containing whitespace
    space_before: tuple[bool, ...]  # per word: the text had whitespace right before it (never the first)


def tokenize(text: str, mask_token: str = "[MASK]") -> Tokens:
    """Split text into words and punctuation; `detokenize(*tokenize(t))` equals t with whitespace runs collapsed."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize: expected str, got {type(text).__name__}")
    word_re, space_re = _patterns(mask_token)
    words = tuple(word_re.findall(text))
    spaces = space_re.findall(text)
    if spaces:
        spaces[0] = ""
    if len(spaces) != len(words):  # cannot happen: both scans match the same words
        raise AssertionError(f"tokenize: {len(words)} words but {len(spaces)} space flags in {text[:80]!r}")
    return Tokens(words, tuple(map(bool, spaces)))


def detokenize(words: list[str] | tuple[str, ...], space_before: list[bool] | tuple[bool, ...]) -> str:
    """Join words back into text, one space where the original had whitespace (none before the first)."""
    parts = [(" " + w) if sp else w for w, sp in zip(words, space_before)]
    if parts and space_before[0]:
        parts[0] = words[0]
    return "".join(parts)


def is_eligible(word: str, mask_token: str = "[MASK]") -> bool:
    """Only words with a letter or digit may be masked or replaced; punctuation never is."""
    return word != mask_token and _ALNUM.search(word) is not None
