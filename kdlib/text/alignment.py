"""Character-span alignment of two tokenizations of the same text (cross-tokenizer distillation).

A teacher and a student with different vocabularies cannot compare distributions token by token; they
can compare them where both have just read the same characters. `align_spans` finds those places: the
smallest runs of teacher tokens and student tokens that cover exactly the same characters.

Rules (offsets are (start, end) character spans into `text`, as fast tokenizers return them):

- Whitespace-insensitive. Positions are measured in non-whitespace characters before them
  (`str.isspace`), because tokenizers disagree on whether a token's span includes the space before
  it. A token whose span is empty (start >= end) or holds only whitespace (a tab token) is zero-width.
- Boundaries. After a positive-width token a tokenization has a boundary only if the next positive-width
  token starts at or after the furthest end reached so far: overlapping byte pieces of one character
  (GPT-2's 'é' -> 'Ã', '©') never split a span. A span boundary is a boundary in BOTH tokenizations,
  and each span is the run of tokens between two consecutive span boundaries.
- Zero-width tokens belong to the span that FOLLOWS them (a bare space token before a word, an
  end-of-document token before the next document); those after the last positive-width token of a
  side are in no span.
- Characters one side does not cover (a normalizer that drops characters, a truncated side) cannot be
  aligned: the region between the common boundaries around them yields no span (`coverage` < 1).
- Validation. Every offset must lie in [0, len(text)], and positive-width tokens must have
  non-decreasing starts; otherwise `KDError` names the side and the token index. Empty-span tokens
  are exempt from the order check: Hugging Face reports special tokens as (0, 0) wherever they sit.

One linear pass per side plus a two-pointer merge: a 128-token row takes a fraction of a millisecond.
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple, Optional, Sequence

import numpy as np

from kdlib.errors import KDError

DEFAULT_PROBE = ("Café naïve  über: 12,500 in 1999 (approx.)\tdone.\n"
                 "Snow ☃ falls on x😀y, déjà vu — OK!")


class Span(NamedTuple):
    """Half-open token ranges of both sides covering the same characters, text[char_begin:char_end]
    (the span's first to last non-whitespace character)."""

    teacher_begin: int
    teacher_end: int
    student_begin: int
    student_end: int
    char_begin: int
    char_end: int


def _pairs(side: str, offsets) -> list:
    """Offsets as a list of (start, end) pairs (numpy arrays and tensors become Python ints)."""
    offsets = offsets.tolist() if hasattr(offsets, "tolist") else list(offsets)
    if any(len(pair) != 2 for pair in offsets):
        raise KDError(f"{side} offsets: expected (start, end) pairs, got {offsets!r:.80}")
    return offsets


def _segments(side: str, offsets: list, n_chars: int, lo: int, spaces: list[int]) -> list[tuple]:
    """Validate one side's offsets and merge its tokens into segments: maximal runs of overlapping
    positive-width tokens, as (start, end, lead, last, raw_start, raw_end) where start/end count
    non-whitespace characters, `lead` is the first token index the segment owns (zero-width tokens
    before it are its prefix) and `last` its last positive-width token. One linear pass."""
    segments = []
    prev_start = 0
    lead = 0
    seg = None
    for index, (start, end) in enumerate(offsets):
        if not (0 <= start <= n_chars and 0 <= end <= n_chars):
            raise KDError(f"{side} token {index}: offsets ({start}, {end}) lie outside the text "
                          f"[0, {n_chars}]")
        if start >= end:
            continue  # empty span: a special token, placed by its position in the sequence
        if start < prev_start:
            raise KDError(f"{side} token {index}: offsets ({start}, {end}) start before the previous "
                          f"token's start {prev_start}; expected non-decreasing starts")
        prev_start = start
        a, b = start - lo, end - lo
        a, b = a - spaces[a], b - spaces[b]
        if a >= b:
            continue  # whitespace only
        if seg is not None:
            if a < seg[1]:  # overlaps the segment so far: pieces of one character
                seg = (seg[0], max(seg[1], b), lead, index, seg[4], max(seg[5], end))
                continue
            segments.append(seg)
            lead = seg[3] + 1
        seg = (a, b, lead, index, start, end)
    if seg is not None:
        segments.append(seg)
    return segments


def align_spans(text: str, teacher_offsets: Sequence, student_offsets: Sequence) -> list[Span]:
    """The smallest token runs of both sides that cover the same characters, in text order."""
    teacher_offsets = _pairs("teacher", teacher_offsets)
    student_offsets = _pairs("student", student_offsets)
    # whitespace counts only over the characters the tokens reach: a row may be 128 tokens of a long
    # document; out-of-range offsets are reported by _segments before any lookup
    n_chars = len(text)
    both = teacher_offsets + student_offsets
    lo = min((s for s, e in teacher_offsets if s < e), default=n_chars)
    lo = max(0, min(lo, min((s for s, e in student_offsets if s < e), default=n_chars)))
    hi = min(n_chars, max((e for s, e in both), default=0))
    spaces = list(accumulate(map(str.isspace, text[lo:max(lo, hi)]), initial=0))
    teacher = _segments("teacher", teacher_offsets, n_chars, lo, spaces)
    student = _segments("student", student_offsets, n_chars, lo, spaces)
    spans: list[Span] = []
    i = j = 0
    n_t, n_s = len(teacher), len(student)
    while i < n_t and j < n_s:
        t_first, s_first = teacher[i], student[j]
        if t_first[0] != s_first[0]:  # re-synchronise past characters one side lacks
            if t_first[0] < s_first[0]:
                i += 1
            else:
                j += 1
            continue
        t_end, s_end = t_first[1], s_first[1]
        i += 1
        j += 1
        while t_end != s_end:
            if t_end < s_end:
                if i == n_t or teacher[i][0] != t_end:
                    break  # teacher lacks characters here: no span
                t_end = teacher[i][1]
                i += 1
            else:
                if j == n_s or student[j][0] != s_end:
                    break
                s_end = student[j][1]
                j += 1
        else:
            char_begin, char_end = t_first[4], teacher[i - 1][5]
            while text[char_begin].isspace():
                char_begin += 1
            while text[char_end - 1].isspace():
                char_end -= 1
            spans.append(Span(t_first[2], teacher[i - 1][3] + 1, s_first[2], student[j - 1][3] + 1,
                              char_begin, char_end))
    return spans


def span_ends(spans: Sequence[Span]) -> tuple[np.ndarray, np.ndarray]:
    """Last teacher and last student token index of each span: where both predict what follows the
    same characters, so causal next-token losses compare these positions."""
    teacher = np.fromiter((s.teacher_end - 1 for s in spans), dtype=np.int64, count=len(spans))
    student = np.fromiter((s.student_end - 1 for s in spans), dtype=np.int64, count=len(spans))
    return teacher, student


def coverage(text: str, spans: Sequence[Span]) -> float:
    """Fraction of the text's non-whitespace characters inside aligned spans (1.0 for blank text)."""
    total = sum(1 for c in text if not c.isspace())
    if total == 0:
        return 1.0
    covered = sum(1 for s in spans for c in text[s.char_begin:s.char_end] if not c.isspace())
    return covered / total


def alignment_problem(tokenizer, probe: str = DEFAULT_PROBE) -> Optional[str]:
    """None when `tokenizer` yields usable offsets on `probe`, else a sentence saying why not, so a
    run can refuse a student tokenizer before training rather than align garbage."""
    name = type(tokenizer).__name__
    if getattr(tokenizer, "is_fast", None) is False:
        return (f"{name} is a slow (Python) tokenizer and cannot return character offsets; "
                "load the fast version (tokenizer.json) to align it with another tokenizer")
    try:
        encoded = tokenizer(probe, return_offsets_mapping=True, add_special_tokens=False)
    except Exception as exc:  # any tokenizer failure is the reason itself
        return f"{name} cannot return character offsets ({type(exc).__name__}: {exc})"
    if "offset_mapping" not in encoded:  # transformers' slow tokenizers silently ignore the request
        return f"{name} returned no offset_mapping: it cannot report character offsets"
    offsets = [tuple(pair) for pair in encoded["offset_mapping"]]
    if any(len(pair) != 2 for pair in offsets):
        return f"{name} returned offsets that are not (start, end) pairs: {offsets[:3]!r}"
    if not any(start < end for start, end in offsets):
        return f"{name} returned {len(offsets)} tokens whose offsets are all empty for the probe text"
    try:
        spans = align_spans(probe, offsets, offsets)
    except KDError as exc:
        return f"{name} returned unusable offsets for the probe text: {exc}"
    share = coverage(probe, spans)
    if share < 0.9:
        return (f"{name}'s offsets cover only {share:.0%} of the probe's characters: they do not "
                "advance through the text")
    return None
