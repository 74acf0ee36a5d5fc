"""Text normalisation shared by later stages, so that equal texts tokenize identically."""
from __future__ import annotations

import re
import unicodedata

_WS = re.compile(r"\s+")


# Invisible format characters that only get in the way (BOM, zero-width space). Other format
# characters (ZWJ/ZWNJ) are kept: they change how emoji and some scripts (Persian, Hindi) read.
_DROP_FORMAT = frozenset("\ufeff\u200b")


def _is_control(ch: str) -> bool:
    # Cc = C0/C1 control chars; whitespace controls (\t \n \r ...) are kept here and
    # collapsed to one space afterwards.
    return (unicodedata.category(ch) == "Cc" and not ch.isspace()) or ch in _DROP_FORMAT


def normalize_text(text: str) -> str:
    """Unicode NFC, drop control/format characters, collapse all whitespace runs to one space, strip."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_text: expected str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if not _is_control(ch))
    return _WS.sub(" ", text).strip()
