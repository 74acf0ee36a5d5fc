"""Word-level augmentation of examples (Tang et al. 2019, plus TinyBERT's MLM replacement).

Per word, in Tang et al.'s order: with p_mask write the mask token; else with p_mlm (TinyBERT)
take one of the teacher's top-k MLM predictions; else with p_pos write a word of the same POS
tag, sampled by corpus frequency within the tag. Then, per copy, with p_ng keep only a random
contiguous n-gram window, n uniform in [ngram_min, ngram_max]. Punctuation-only words are never
touched. Copy 0 is the original text; copies 1..cfg.copies are augmented.

One engine (`_augment_copies`) makes every decision for any set of copies at once with numpy;
the batch path gives it every copy of a batch, the reference path one copy at a time. Draws are
counter-based (see rng.py), so both give identical outputs whatever the batching or order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import numpy as np

from . import rng
from .config import AugmentConfig
from .tagging import default_tagger, tag_sentence, tag_sentences
from .text import detokenize, is_eligible, tokenize
from .vocab import PosVocabulary

# masked texts -> per text, per mask-token occurrence, candidate whole words (best first)
MlmCandidatesFn = Callable[[list[str]], list[list[list[str]]]]

_KEEP, _MASK, _MLM, _POS = 0, 1, 2, 3
_OP_NAMES = ("keep", "mask", "mlm", "pos")


class AugmentedText(NamedTuple):
    """One output text of an example, with per-word provenance (a NamedTuple: cheap, picklable)."""

    example_id: Hashable  # id of the example it came from
    copy_index: int  # 0 = the original text, 1..copies = augmented copies
    text: str  # the text (the original verbatim for copy 0)
    kind: str  # "original", "unchanged", or the applied ops joined by "+" (mask, mlm, pos, ngram)
    source: range  # per output word: index of the input word it stands for (always contiguous)
    ops: tuple[str, ...]  # per output word: "keep", "mask", "mlm" or "pos"


@dataclass
class _Examples:
    """Tokenised, tagged examples; per-word features live in flat arrays covering all of them."""

    ids: list[Hashable]
    texts: list[str]
    words: list[tuple[str, ...]]
    space_before: list[tuple[bool, ...]]
    pieces: list[tuple[str, ...]]  # per example, per word: the word with its leading space, if any
    offsets: np.ndarray  # int64 per example: where its words start in the flat arrays
    lengths: np.ndarray  # int64 per example: number of words
    eligible: np.ndarray  # bool per word: may be masked or replaced
    tag_ids: np.ndarray  # int64 per word: the vocabulary's tag id, -1 when the tag has no words


def _examples(ids, texts, words_list, spaces_list, tags_list, cfg: AugmentConfig, vocab) -> _Examples:
    for words, spaces, tags in zip(words_list, spaces_list, tags_list):
        if len(tags) != len(words) or len(spaces) != len(words):
            raise ValueError(
                f"tags, space_before: expected one per word ({len(words)}), got {len(tags)} and {len(spaces)}"
            )
    all_words = [w for ws in words_list for w in ws]
    all_tags = [t for ts in tags_list for t in ts]
    # Both features are pure functions of one string: compute each distinct string once.
    eligible_of = {w: is_eligible(w, cfg.mask_token) for w in set(all_words)}
    vocab_ids = vocab.tables().tag_ids if vocab is not None else {}
    tag_id_of = {t: vocab_ids.get(t, -1) for t in set(all_tags)}
    lengths = np.array([len(ws) for ws in words_list], dtype=np.int64)
    return _Examples(
        list(ids),
        list(texts),
        [tuple(ws) for ws in words_list],
        [tuple(sp) for sp in spaces_list],
        [tuple([(" " + w) if sp else w for w, sp in zip(ws, sps)]) for ws, sps in zip(words_list, spaces_list)],
        np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths,
        lengths,
        np.fromiter(map(eligible_of.__getitem__, all_words), dtype=bool, count=len(all_words)),
        np.fromiter(map(tag_id_of.__getitem__, all_tags), dtype=np.int64, count=len(all_tags)),
    )


def _match_case(template: str, word: str) -> str:
    """Give a replacement the capitalisation of the word it replaces (vocabulary words are lowercase)."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _check_inputs(cfg: AugmentConfig, vocab: PosVocabulary | None, mlm_fn: MlmCandidatesFn | None) -> None:
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"cfg: expected AugmentConfig, got {type(cfg).__name__}")
    if cfg.pos_swap_prob > 0 and vocab is None:
        raise ValueError("vocab: expected a PosVocabulary when pos_swap_prob > 0, got None")
    if cfg.mlm_replace_prob > 0 and mlm_fn is None:
        raise ValueError("mlm_candidates_fn: expected a callable when mlm_replace_prob > 0, got None")


def _augment_copies(
    ex: _Examples,
    specs: Sequence[tuple[int, int]],
    cfg: AugmentConfig,
    vocab: PosVocabulary | None,
    mlm_fn: MlmCandidatesFn | None,
) -> list[AugmentedText]:
    """Augment copies given as (example index, copy index >= 1), every decision drawn at once."""
    if not specs:
        return []
    which = np.array([p for p, _ in specs], dtype=np.int64)
    lengths = ex.lengths[which]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    # Flat per-(copy, word) layout: copy j's words sit at starts[j] .. starts[j] + lengths[j].
    counter = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)  # word index in its text
    gather = np.repeat(ex.offsets[which], lengths) + counter
    eligible, tag_ids = ex.eligible[gather], ex.tag_ids[gather]
    keys = np.array([rng.copy_key(cfg.seed, ex.ids[p], c) for p, c in specs], dtype=np.uint64)
    key_flat = np.repeat(keys, lengths)

    # Per-word decisions in Tang et al.'s order; each stream is drawn only if its prob is > 0
    # (a function of cfg alone, so both paths draw the same streams).
    op = np.zeros(total, dtype=np.int8)
    free = eligible.copy()
    if cfg.mask_prob > 0:
        hit = free & (rng.uniforms(key_flat, counter, rng.MASK) < cfg.mask_prob)
        op[hit] = _MASK
        free &= ~hit
    mlm_u = None
    if cfg.mlm_replace_prob > 0:
        hit = free & (rng.uniforms(key_flat, counter, rng.MLM) < cfg.mlm_replace_prob)
        op[hit] = _MLM
        free &= ~hit
        mlm_u = rng.uniforms(key_flat, counter, rng.MLM_PICK)
    pos_word = np.full(total, -1, dtype=np.int64)
    if cfg.pos_swap_prob > 0:
        hit = free & (tag_ids >= 0) & (rng.uniforms(key_flat, counter, rng.POS) < cfg.pos_swap_prob)
        op[hit] = _POS
        idx = np.flatnonzero(hit)
        pos_word[idx] = vocab.sample(tag_ids[idx], rng.uniforms(key_flat[idx], counter[idx], rng.POS_PICK))

    # Per-copy n-gram window (counters 0, 1, 2 of the NGRAM stream).
    win_start = np.zeros(len(specs), dtype=np.int64)
    win_len = lengths.copy()
    if cfg.ngram_prob > 0:
        zeros = np.zeros(len(specs), dtype=np.int64)
        apply = rng.uniforms(keys, zeros, rng.NGRAM) < cfg.ngram_prob
        span = cfg.ngram_max - cfg.ngram_min + 1
        n = cfg.ngram_min + np.floor(rng.uniforms(keys, zeros + 1, rng.NGRAM) * span).astype(np.int64)
        n = np.minimum(n, lengths)
        s = np.floor(rng.uniforms(keys, zeros + 2, rng.NGRAM) * (lengths - n + 1)).astype(np.int64)
        win_start = np.where(apply, s, 0)
        win_len = np.where(apply, n, lengths)

    changed = np.flatnonzero(op)
    bounds = np.searchsorted(changed, np.append(starts, total)).tolist()
    changed_l, op_l, pos_l = changed.tolist(), op[changed].tolist(), pos_word[changed].tolist()
    flat_words = vocab.tables().flat_words if vocab is not None else []
    mlm_pick = _mlm_replacements(ex, specs, cfg, mlm_fn, op, starts, lengths, mlm_u) if mlm_u is not None else {}

    out = []
    mask_token, names = cfg.mask_token, _OP_NAMES
    for j, (p, copy_index), base, n, a, w in zip(
        range(len(specs)), specs, starts.tolist(), lengths.tolist(), win_start.tolist(), win_len.tolist()
    ):
        words, spaces = ex.words[p], ex.space_before[p]
        b = a + w
        lo, hi = bounds[j], bounds[j + 1]
        if lo == hi:  # nothing replaced: the (windowed) original
            text = "".join(ex.pieces[p][a:b])
            ops: tuple[str, ...] = ("keep",) * w
            used: set[int] = set()
        else:
            pieces, op_names = list(ex.pieces[p]), ["keep"] * n
            used = set()
            for k in range(lo, hi):
                i, code = changed_l[k] - base, op_l[k]
                if code == _MASK:
                    word = mask_token
                elif code == _POS:
                    word = _match_case(words[i], flat_words[pos_l[k]])
                else:
                    word = mlm_pick.get(changed_l[k])
                    if word is None:  # the teacher gave no usable candidate: keep the word
                        continue
                    word = _match_case(words[i], word)
                pieces[i] = (" " + word) if spaces[i] else word
                op_names[i] = names[code]
                if a <= i < b:
                    used.add(code)
            text = "".join(pieces[a:b])
            ops = tuple(op_names[a:b])
        if w and spaces[a]:
            text = text[1:]
        kind = [names[c] for c in (_MASK, _MLM, _POS) if c in used]
        if w < n:
            kind.append("ngram")
        out.append(AugmentedText(ex.ids[p], copy_index, text, "+".join(kind) or "unchanged", range(a, b), ops))
    return out


def _mlm_replacements(ex: _Examples, specs, cfg, mlm_fn, op, starts, lengths, mlm_u) -> dict[int, str]:
    """Ask the teacher once for all copies with MLM positions; flat word index -> chosen word."""
    texts, slots = [], []  # per asked copy: masked text, and where its own masks are
    for j, (p, _) in enumerate(specs):
        base, n = int(starts[j]), int(lengths[j])
        chosen = np.flatnonzero(op[base : base + n] == _MLM).tolist()
        if not chosen:
            continue
        words = list(ex.words[p])
        for i in chosen:
            words[i] = cfg.mask_token
        # Candidates come per mask-token occurrence, including any the input text already had.
        occurrences = [i for i, w in enumerate(words) if w == cfg.mask_token]
        texts.append(detokenize(words, ex.space_before[p]))
        slots.append((base, occurrences, set(chosen)))
    if not texts:
        return {}
    results = mlm_fn(texts)
    if len(results) != len(texts):
        raise ValueError(f"mlm_candidates_fn: expected {len(texts)} results, got {len(results)}")
    picks: dict[int, str] = {}
    for text, (base, occurrences, chosen), per_mask in zip(texts, slots, results):
        if len(per_mask) != len(occurrences):
            raise ValueError(
                f"mlm_candidates_fn: expected {len(occurrences)} candidate lists for {text[:80]!r}, got {len(per_mask)}"
            )
        for i, cands in zip(occurrences, per_mask):
            cands = [c for c in cands[: cfg.mlm_top_k] if c and not any(ch.isspace() for ch in c)]
            if i in chosen and cands:
                u = float(mlm_u[base + i])
                picks[base + i] = cands[min(int(u * len(cands)), len(cands) - 1)]
    return picks


def _original(ex: _Examples, p: int) -> AugmentedText:
    n = len(ex.words[p])
    return AugmentedText(ex.ids[p], 0, ex.texts[p], "original", range(n), ("keep",) * n)


def augment_example(
    words: Sequence[str],
    tags: Sequence[str],
    cfg: AugmentConfig,
    vocab: PosVocabulary | None,
    example_id: Hashable,
    copy_index: int,
    *,
    space_before: Sequence[bool] | None = None,
    mlm_candidates_fn: MlmCandidatesFn | None = None,
) -> AugmentedText:
    """Augmented copy `copy_index` (>= 1) of one tokenised, tagged example."""
    if isinstance(copy_index, bool) or not isinstance(copy_index, int) or copy_index < 1:
        raise ValueError(f"copy_index: expected an int >= 1 (0 is the original), got {copy_index!r}")
    _check_inputs(cfg, vocab, mlm_candidates_fn)
    if space_before is None:
        space_before = [i > 0 for i in range(len(words))]
    ex = _examples([example_id], [detokenize(words, space_before)], [words], [space_before], [tags], cfg, vocab)
    return _augment_copies(ex, [(0, copy_index)], cfg, vocab, mlm_candidates_fn)[0]


def serial_augment(
    examples: Sequence[tuple[Hashable, str]],
    cfg: AugmentConfig,
    vocab: PosVocabulary | None,
    tagger: Any = None,
    mlm_candidates_fn: MlmCandidatesFn | None = None,
) -> list[AugmentedText]:
    """Reference path: one tagger call per example and one `augment_example` call per copy."""
    _check_inputs(cfg, vocab, mlm_candidates_fn)
    tagger = default_tagger() if tagger is None else tagger
    out = []
    for example_id, text in examples:
        toks = tokenize(text, cfg.mask_token)
        tags = tag_sentence(tagger, toks.words)
        n = len(toks.words)
        out.append(AugmentedText(example_id, 0, text, "original", range(n), ("keep",) * n))
        for c in range(1, cfg.copies + 1):
            out.append(
                augment_example(
                    toks.words, tags, cfg, vocab, example_id, c,
                    space_before=toks.space_before, mlm_candidates_fn=mlm_candidates_fn,
                )
            )
    return out


def augment_batch(
    examples: Sequence[tuple[Hashable, str]],
    cfg: AugmentConfig,
    vocab: PosVocabulary | None,
    tagger: Any = None,
    mlm_candidates_fn: MlmCandidatesFn | None = None,
) -> list[AugmentedText]:
    """Fast path: one tagger call and one vectorised draw for the whole batch (same output as serial).

    Returns, per example in input order, the original (copy 0) then copies 1..cfg.copies.
    """
    _check_inputs(cfg, vocab, mlm_candidates_fn)
    tagger = default_tagger() if tagger is None else tagger
    toks = [tokenize(text, cfg.mask_token) for _, text in examples]
    words = [t.words for t in toks]
    ex = _examples(
        [i for i, _ in examples], [t for _, t in examples], words, [t.space_before for t in toks],
        tag_sentences(tagger, words), cfg, vocab,
    )
    specs = [(p, c) for p in range(len(examples)) for c in range(1, cfg.copies + 1)]
    augmented = _augment_copies(ex, specs, cfg, vocab, mlm_candidates_fn)
    out, at = [], 0
    for p in range(len(examples)):
        out.append(_original(ex, p))
        out.extend(augmented[at : at + cfg.copies])
        at += cfg.copies
    return out
