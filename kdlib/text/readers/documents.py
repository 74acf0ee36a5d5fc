"""The two record types every reader yields, so later stages never see file formats."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Document:
    """Unlabelled corpus text; `id` is stable across runs and machines (e.g. `wiki:12`, `lee.cor:7`)."""

    id: str
    text: str


@dataclass(frozen=True)
class Example:
    """Labelled task example; `label` is kept as written in the file, the caller builds the vocab."""

    id: str
    text: str
    label: str
    text_b: Optional[str] = None  # second segment for sentence-pair tasks
