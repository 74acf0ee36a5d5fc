"""POS tagging of pre-tokenised words with TextBlob's PatternTagger (Penn tags, no NLTK data needed).

Measured on 2,000 lee_background sentences (textblob 0.20.1): the tagger's cost is per token
(lexicon look-ups), not per call, and one `tag()` call on newline-joined sentences is ~2x *slower*
than one call per sentence (it formats and re-parses a tagged string). The batch path therefore
hands the whole batch, as token lists, to the same pattern parser that `PatternTagger.tag` uses,
in one call without the string round trip; tags are identical (tests check it).
"""
from __future__ import annotations

from typing import Any, Sequence


def default_tagger() -> Any:
    """TextBlob's PatternTagger; imported lazily because textblob loads its lexicon on first use."""
    from textblob.en.taggers import PatternTagger  # ~3.7 s to import: `python -m data_pipeline --help` runs without it

    return PatternTagger()


def _check_count(words: Sequence[str], pairs: Sequence[Any]) -> None:
    if len(pairs) != len(words):
        raise ValueError(
            f"tagger: expected one tag per word ({len(words)} words), got {len(pairs)} tags for {' '.join(words)[:80]!r}"
        )


def tag_sentence(tagger: Any, words: Sequence[str]) -> list[str]:
    """Tags of one sentence with one `tagger.tag` call (the reference path)."""
    if not words:
        return []
    pairs = tagger.tag(" ".join(words), tokenize=False)  # tokenize=False splits on single spaces
    _check_count(words, pairs)
    return [tag for _, tag in pairs]


def tag_sentences(tagger: Any, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
    """Tags of many sentences with one tagger call; empty sentences get empty tag lists."""
    nonempty = [list(ws) for ws in sentences if ws]
    if not nonempty:
        return [[] for _ in sentences]
    # textblob: ~3.7 s to import; data_pipeline's --help and config checks import this module without it
    from textblob.en import parser as pattern_parser
    from textblob.en.taggers import PatternTagger

    if type(tagger) is PatternTagger:
        # PatternTagger.tag(s, tokenize=False) == parse(s.split("\n") -> split(" ")) -> find_tags per
        # sentence; a list of token lists enters that loop directly, collapse=False skips the
        # TaggedString formatting and re-splitting, and map=None skips the English parser's
        # identity (token, tag) map, which only re-allocates every token.
        tagged = pattern_parser.parse(
            nonempty, tokenize=False, tags=True, chunks=False, relations=False, lemmata=False,
            collapse=False, map=None,
        )
        per_sentence = [[tok[1] for tok in sent] for sent in tagged]
    else:
        # Any other tagger with PatternTagger's interface: one call, sentences split by newlines.
        pairs = tagger.tag("\n".join(" ".join(ws) for ws in nonempty), tokenize=False)
        _check_count([w for ws in nonempty for w in ws], pairs)
        per_sentence, at = [], 0
        for ws in nonempty:
            per_sentence.append([tag for _, tag in pairs[at : at + len(ws)]])
            at += len(ws)
    for ws, tags in zip(nonempty, per_sentence):
        _check_count(ws, tags)
    it = iter(per_sentence)
    return [next(it) if ws else [] for ws in sentences]
