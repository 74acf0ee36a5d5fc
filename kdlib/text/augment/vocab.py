"""Per-POS-tag word vocabulary with counts, for Tang et al.'s same-POS swaps.

Tang et al. sample the replacement "from a unigram word distribution re-normalized by the POS
tag", so counts are kept and sampling is frequency-weighted. Built once from a corpus with the
real tagger, saved as JSON (never pickle) and shipped to pipeline workers.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kdlib.errors import ReaderError

from .tagging import default_tagger, tag_sentences
from .text import is_eligible, tokenize

FORMAT = "kdlib.text.augment.PosVocabulary"
VERSION = 1


@dataclass
class _Tables:
    tag_ids: dict[str, int]
    flat_words: list[str]
    cum: np.ndarray  # inclusive cumulative counts over all tags' words, concatenated
    base: np.ndarray  # per tag id: cumulative count before its first word
    total: np.ndarray  # per tag id: total count


@dataclass
class PosVocabulary:
    """tag -> [(lowercased word, count)], most frequent first, ties by word; only counts >= min_count."""

    entries: dict[str, list[tuple[str, int]]]  # per Penn tag, (word, count) sorted by (-count, word)
    min_count: int = 1  # words seen fewer times than this (under a tag) were left out
    _tables: _Tables | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count: expected an int >= 1, got {self.min_count!r}")
        canon: dict[str, list[tuple[str, int]]] = {}
        for tag in sorted(self.entries):
            rows = self.entries[tag]
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"entries: expected non-empty string tags, got {tag!r}")
            clean = []
            for row in rows:
                word, count = row
                if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
                    raise ValueError(f"entries[{tag!r}]: expected a word without whitespace, got {word!r}")
                if isinstance(count, bool) or not isinstance(count, int) or count < self.min_count:
                    raise ValueError(f"entries[{tag!r}][{word!r}]: expected a count >= {self.min_count}, got {count!r}")
                clean.append((word, count))
            if len({w for w, _ in clean}) != len(clean):
                raise ValueError(f"entries[{tag!r}]: expected each word once")
            if clean:
                canon[tag] = sorted(clean, key=lambda wc: (-wc[1], wc[0]))
        self.entries = canon

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        tagger: Any = None,
        min_count: int = 1,
        max_words_per_tag: int | None = None,
        batch_size: int = 1024,
        mask_token: str = "[MASK]",
    ) -> "PosVocabulary":
        """Tag every text (in batches) and count lowercased eligible words per tag."""
        tagger = default_tagger() if tagger is None else tagger
        counts: dict[str, Counter[str]] = {}
        batch: list[tuple[str, ...]] = []

        def flush() -> None:
            for words, tags in zip(batch, tag_sentences(tagger, batch)):
                for word, tag in zip(words, tags):
                    if is_eligible(word, mask_token):
                        counts.setdefault(tag, Counter())[word.lower()] += 1
            batch.clear()

        for text in texts:
            batch.append(tokenize(text, mask_token).words)
            if len(batch) >= batch_size:
                flush()
        flush()
        entries = {}
        for tag, counter in counts.items():
            rows = sorted(((w, c) for w, c in counter.items() if c >= min_count), key=lambda wc: (-wc[1], wc[0]))
            entries[tag] = rows[:max_words_per_tag] if max_words_per_tag is not None else rows
        return cls(entries, min_count)

    def words(self, tag: str) -> list[str]:
        """The words of a tag, most frequent first ([] for an unknown tag)."""
        return [w for w, _ in self.entries.get(tag, [])]

    # --- sampling -------------------------------------------------------------------------------
    def tables(self) -> _Tables:
        """Flat arrays for vectorised frequency-weighted sampling (built once, cached)."""
        if self._tables is None:
            tags = sorted(self.entries)
            flat_words = [w for t in tags for w, _ in self.entries[t]]
            counts = np.array([c for t in tags for _, c in self.entries[t]], dtype=np.int64)
            totals = np.array([sum(c for _, c in self.entries[t]) for t in tags], dtype=np.int64)
            base = np.concatenate([[0], np.cumsum(totals)[:-1]]).astype(np.int64) if tags else totals
            self._tables = _Tables({t: i for i, t in enumerate(tags)}, flat_words, np.cumsum(counts), base, totals)
        return self._tables

    def sample(self, tag_ids: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Flat word indices drawn with probability count/total within each tag, from uniforms u."""
        t = self.tables()
        tag_ids = np.asarray(tag_ids, dtype=np.int64)
        total = t.total[tag_ids]
        r = np.minimum(np.floor(np.asarray(u) * total).astype(np.int64), total - 1)
        return np.searchsorted(t.cum, t.base[tag_ids] + r, side="right")

    # --- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """Canonical JSON text (same vocabulary -> same bytes)."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "min_count": self.min_count,
            "tags": {t: [[w, c] for w, c in rows] for t, rows in self.entries.items()},
        }
        return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "PosVocabulary":
        """Parse `to_json` output; a malformed document raises ReaderError naming source and problem."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReaderError(f"{source}: line {e.lineno}: expected JSON, got {e.msg}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ReaderError(f"{source}: format: expected {FORMAT!r}, got {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}")
        if payload.get("version") != VERSION:
            raise ReaderError(f"{source}: version: expected {VERSION}, got {payload.get('version')!r}")
        tags = payload.get("tags")
        if not isinstance(tags, dict) or not all(isinstance(rows, list) for rows in tags.values()):
            raise ReaderError(f"{source}: tags: expected an object of [word, count] lists")
        try:
            entries = {t: [_row(r) for r in rows] for t, rows in tags.items()}
            return cls(entries, payload.get("min_count"))
        except (ValueError, TypeError) as e:
            raise ReaderError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "PosVocabulary":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReaderError(f"{path}: cannot read POS vocabulary: {e}") from None
        return cls.from_json(text, source=str(path))


def _row(r: Any) -> tuple[str, int]:
    if not isinstance(r, list) or len(r) != 2:
        raise ValueError(f"tags: expected [word, count] pairs, got {r!r}")
    return r[0], r[1]
