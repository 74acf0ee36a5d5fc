"""Tests of kdlib.text.augment: rates, POS swaps, n-gram windows, determinism, batch == serial, MLM."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter

import numpy as np
import pytest

from kdlib.text.augment import (
    AugmentConfig,
    PosVocabulary,
    augment_batch,
    augment_example,
    default_tagger,
    detokenize,
    is_eligible,
    make_mlm_candidates_fn,
    serial_augment,
    tag_sentence,
    tag_sentences,
    tokenize,
)
from kdlib.text.augment import rng
from kdlib.errors import ReaderError

_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


@pytest.fixture(scope="module")
def lee():
    """(documents, sentences) of gensim's Lee background corpus (real news text)."""
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    with open(path, encoding="utf-8") as f:
        docs = [line.strip() for line in f if line.strip()]
    sents = [s.strip() for d in docs for s in _SENT_END.split(d) if s.strip()]
    assert len(sents) > 2000
    return docs, sents


@pytest.fixture(scope="module")
def tagger():
    return default_tagger()


@pytest.fixture(scope="module")
def vocab(lee, tagger):
    return PosVocabulary.build(lee[0], tagger, min_count=2)


def _cfg(**kw):
    base = dict(copies=2, seed=7, mask_prob=0.0, pos_swap_prob=0.0, ngram_prob=0.0)
    base.update(kw)
    return AugmentConfig(**base)


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("copies", -1),
        ("copies", 1.5),
        ("seed", "0"),
        ("mask_prob", 1.2),
        ("pos_swap_prob", -0.1),
        ("ngram_prob", float("nan")),
        ("mlm_replace_prob", 2),
        ("ngram_min", 0),
        ("ngram_max", 0),
        ("mlm_top_k", 0),
        ("mask_token", ""),
        ("mask_token", "[MA SK]"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        AugmentConfig(**{field: value})


def test_config_ngram_min_above_max_names_field():
    with pytest.raises(ValueError, match=r"^ngram_min: expected <= ngram_max \(3\), got 4"):
        AugmentConfig(ngram_min=4, ngram_max=3)


@pytest.mark.slow
def test_missing_vocab_or_mlm_fn_is_reported(tagger):
    with pytest.raises(ValueError, match="^vocab: expected"):
        augment_batch([(0, "a cat")], _cfg(pos_swap_prob=0.5), None, tagger)
    with pytest.raises(ValueError, match="^mlm_candidates_fn: expected"):
        augment_batch([(0, "a cat")], _cfg(mlm_replace_prob=0.5), None, tagger)
    with pytest.raises(ValueError, match="^copy_index: expected"):
        augment_example(["a"], ["DT"], _cfg(), None, "x", 0)


# --- tokenizer and rng -------------------------------------------------------------------------
def test_tokenize_maps_words_back_to_text():
    toks = tokenize('  Hi, [MASK] south-west of\n it\'s "ok"!! 4:00pm ')
    assert toks.words == ("Hi", ",", "[MASK]", "south-west", "of", "it's", '"', "ok", '"', "!", "!", "4", ":", "00pm")
    assert toks.space_before == (
        False, False, True, True, True, True, True, False, False, False, False, True, False, False,
    )
    assert detokenize(toks.words, toks.space_before) == 'Hi, [MASK] south-west of it\'s "ok"!! 4:00pm'
    assert tokenize("x[MASK]y") == (("x", "[MASK]", "y"), (False, False, False))
    assert tokenize(" \t ") == ((), ())
    assert [is_eligible(w) for w in ("Hi", ",", "[MASK]", "!", "4", "__", "a_b")] == [
        True, False, False, False, True, False, True,
    ]


def test_copy_key_is_blake2b_and_uniforms_match_scalar_splitmix():
    expected = int.from_bytes(hashlib.blake2b(b"3:doc-9:2", digest_size=8).digest(), "little")
    assert rng.copy_key(3, "doc-9", 2) == expected
    keys = np.array([expected, 1, 2**64 - 1], dtype=np.uint64)
    counters = np.array([0, 5, 1000])
    got = rng.uniforms(keys, counters, rng.POS)
    want = [rng.uniform_scalar(int(k), int(c), rng.POS) for k, c in zip(keys, counters)]
    assert got.tolist() == want
    # Hand-computed splitmix64 for key 0, stream 0, counter 0: sub = mix(0) = 0, z = mix(golden).
    m = (1 << 64) - 1
    x = 0x9E3779B97F4A7C15
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
    assert rng.uniforms(np.array([0], dtype=np.uint64), np.array([0]), 0)[0] == (x >> 11) / 2.0**53
    big = rng.uniforms(np.full(20000, expected, dtype=np.uint64), np.arange(20000), rng.MASK)
    assert 0.0 <= big.min() and big.max() < 1.0 and abs(big.mean() - 0.5) < 0.01


# --- tagging -----------------------------------------------------------------------------------
class _WrappedTagger:
    """A non-PatternTagger object with the same interface: exercises the newline-joined call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def tag(self, text, tokenize=True):
        self.calls += 1
        return self.inner.tag(text, tokenize=tokenize)


@pytest.mark.slow
def test_batch_tagging_equals_one_call_per_sentence(lee, tagger):
    sents = [tokenize(s).words for s in lee[1][:150]] + [()]
    one_by_one = [tag_sentence(tagger, ws) for ws in sents]
    assert tag_sentences(tagger, sents) == one_by_one
    wrapped = _WrappedTagger(tagger)
    assert tag_sentences(wrapped, sents) == one_by_one
    assert wrapped.calls == 1
    assert one_by_one[0][:4] == ["NNS", "IN", "NNS", "VBP"]  # "Hundreds of people have"


# --- vocabulary --------------------------------------------------------------------------------
@pytest.mark.slow
def test_vocabulary_counts_words_per_tag(tagger):
    texts = ["The cat sat on the mat.", "The dog sat on a mat!", "A cat ran."]
    vocab = PosVocabulary.build(texts, tagger, min_count=2)
    expected: dict[str, Counter] = {}
    for t in texts:
        words = tokenize(t).words
        for w, tag in zip(words, tag_sentence(tagger, words)):
            if any(ch.isalnum() for ch in w):
                expected.setdefault(tag, Counter())[w.lower()] += 1
    want = {
        tag: sorted([(w, c) for w, c in cnt.items() if c >= 2], key=lambda wc: (-wc[1], wc[0]))
        for tag, cnt in expected.items()
    }
    assert vocab.entries == {t: rows for t, rows in want.items() if rows}
    assert vocab.words("DT")[0] == "the" and ("the", 3) in vocab.entries["DT"]
    assert "." not in {w for rows in vocab.entries.values() for w, _ in rows}


@pytest.mark.slow
def test_vocabulary_json_round_trip(vocab, tmp_path):
    again = PosVocabulary.from_json(vocab.to_json())
    assert again == vocab and again.to_json() == vocab.to_json()
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert PosVocabulary.load(path) == vocab
    assert json.loads(path.read_text())["format"] == "kdlib.text.augment.PosVocabulary"
    path.write_text('{"format": "kdlib.text.augment.PosVocabulary", "version": 1, "min_count": 2, "tags": {"NN": [["x", 1]]}}')
    with pytest.raises(ReaderError, match=r"vocab\.json: entries\['NN'\]\['x'\]: expected a count >= 2, got 1"):
        PosVocabulary.load(path)
    path.write_text("{not json")
    with pytest.raises(ReaderError, match=r"vocab\.json: line 1: expected JSON"):
        PosVocabulary.load(path)


def test_vocabulary_sampling_is_frequency_weighted():
    vocab = PosVocabulary({"NN": [("a", 3), ("b", 1)], "VB": [("go", 1), ("run", 1)]})
    t = vocab.tables()
    nn, vb = t.tag_ids["NN"], t.tag_ids["VB"]
    u = np.array([0.0, 0.3, 0.7, 0.74, 0.76, 0.99, 0.2, 0.6])
    idx = vocab.sample(np.array([nn] * 6 + [vb] * 2), u)
    # NN: total 4, r = floor(u*4) = 0,1,2,2,3,3 -> a,a,a,a,b,b; VB: r = floor(u*2) = 0,1 -> go,run
    assert [t.flat_words[i] for i in idx] == ["a", "a", "a", "a", "b", "b", "go", "run"]


# --- the augmentation --------------------------------------------------------------------------
@pytest.mark.slow
def test_mask_rate_within_binomial_tolerance(lee, tagger):
    cfg = _cfg(copies=2, mask_prob=0.15)
    examples = list(enumerate(lee[1][:120]))
    out = [a for a in augment_batch(examples, cfg, None, tagger) if a.copy_index > 0]
    eligible = masked = 0
    words_of = {i: tokenize(t).words for i, t in examples}
    for a in out:
        words = words_of[a.example_id]
        out_words = tokenize(a.text).words
        assert len(out_words) == len(words)
        for w, o, op in zip(words, out_words, a.ops):
            eligible += is_eligible(w)
            if op == "mask":
                masked += 1
                assert is_eligible(w) and o == "[MASK]"
            else:
                assert o == w
    assert eligible >= 4500
    sigma = math.sqrt(eligible * 0.15 * 0.85)
    assert abs(masked - 0.15 * eligible) <= 4 * sigma, (masked, eligible)


@pytest.mark.slow
def test_pos_swaps_keep_the_tag_and_never_touch_punctuation(lee, tagger, vocab):
    cfg = _cfg(copies=3, pos_swap_prob=0.5)
    examples = list(enumerate(lee[1][200:300]))
    swaps = 0
    for a in augment_batch(examples, cfg, vocab, tagger):
        words = tokenize(examples[a.example_id][1]).words
        tags = tag_sentence(tagger, words)
        out_words = tokenize(a.text).words
        for src, o, op in zip(a.source, out_words, a.ops):
            if op == "pos":
                swaps += 1
                assert o.lower() in vocab.words(tags[src]), (words[src], tags[src], o)
                if o[:1].isalpha():  # the replacement takes the original's capitalisation
                    assert words[src][:1].isupper() == o[:1].isupper()
            else:
                assert o == words[src]
            if not is_eligible(words[src]):
                assert op == "keep"
    # Rate: every eligible word whose tag has vocabulary words is swapped with probability 0.5.
    candidates = sum(
        is_eligible(w) and bool(vocab.words(t))
        for _, text in examples
        for w, t in zip(tokenize(text).words, tag_sentence(tagger, tokenize(text).words))
    ) * cfg.copies
    assert candidates > 1500
    assert abs(swaps - 0.5 * candidates) <= 4 * math.sqrt(candidates * 0.25), (swaps, candidates)


@pytest.mark.slow
def test_mask_then_pos_order_and_punctuation_untouched(tagger, vocab):
    cfg = _cfg(copies=1, mask_prob=1.0, pos_swap_prob=1.0)
    (orig, copy) = augment_batch([("p", "Wait -- is it 4:00pm, Bob?!")], cfg, vocab, tagger)
    assert copy.text == "[MASK] -- [MASK] [MASK] [MASK]:[MASK], [MASK]?!"
    assert copy.kind == "mask"


@pytest.mark.slow
def test_ngram_windows_are_contiguous_with_bounded_length(lee, tagger):
    cfg = _cfg(copies=4, ngram_prob=1.0, ngram_min=2, ngram_max=4)
    examples = list(enumerate(lee[1][:100])) + [(100, "Hi."), (101, "One"), (102, "")]
    lengths = Counter()
    for a in augment_batch(examples, cfg, None, tagger):
        toks = tokenize(examples[a.example_id][1])
        n = len(toks.words)
        if a.copy_index == 0:
            assert a.source == range(n) and a.text == examples[a.example_id][1]
            continue
        lo, hi = (a.source[0], a.source[-1] + 1) if a.source else (0, 0)
        assert a.source == range(lo, hi) and isinstance(a.source, range)
        assert a.text == detokenize(toks.words[lo:hi], toks.space_before[lo:hi])
        if n >= 2:
            assert 2 <= hi - lo <= min(4, n)
            assert a.kind == ("ngram" if hi - lo < n else "unchanged")
        else:
            assert (lo, hi) == (0, n) and a.kind == "unchanged"
        lengths[hi - lo] += 1
    assert {2, 3, 4} <= set(lengths)


@pytest.mark.slow
def test_ngram_probability_is_per_copy(lee, tagger):
    cfg = _cfg(copies=10, ngram_prob=0.25)
    out = [a for a in augment_batch(list(enumerate(lee[1][:100])), cfg, None, tagger) if a.copy_index]
    k = sum(a.kind == "ngram" for a in out)
    assert abs(k - 250) <= 4 * math.sqrt(1000 * 0.25 * 0.75)


@pytest.mark.slow
def test_determinism_per_seed_id_and_copy(lee, tagger, vocab):
    cfg = _cfg(mask_prob=0.15, pos_swap_prob=0.15)
    toks = tokenize(max(lee[1][:300], key=len))
    tags = tag_sentence(tagger, toks.words)
    kw = dict(space_before=toks.space_before)
    a1 = augment_example(toks.words, tags, cfg, vocab, "doc", 1, **kw)
    assert a1 == augment_example(toks.words, tags, cfg, vocab, "doc", 1, **kw)
    assert a1.text != augment_example(toks.words, tags, cfg, vocab, "doc", 2, **kw).text
    assert a1.text != augment_example(toks.words, tags, cfg, vocab, "doc2", 1, **kw).text
    other_seed = AugmentConfig(**{**cfg.__dict__, "seed": 8})
    assert a1.text != augment_example(toks.words, tags, other_seed, vocab, "doc", 1, **kw).text
    # Per-word decisions are counter-based: the mask decision of word i is u(key, MASK, i) < p.
    key = rng.copy_key(7, "doc", 1)
    want = [
        is_eligible(w) and rng.uniform_scalar(key, i, rng.MASK) < 0.15 for i, w in enumerate(toks.words)
    ]
    assert [op == "mask" for op in a1.ops] == want


@pytest.mark.slow
def test_batch_equals_serial_and_is_order_and_split_independent(lee, tagger, vocab):
    cfg = AugmentConfig(copies=3, seed=11, mask_prob=0.1, pos_swap_prob=0.1, ngram_prob=0.25)
    examples = [(f"s{i}", s) for i, s in enumerate(lee[1][:200])] + [("empty", ""), ("punct", "?!")]
    batch = augment_batch(examples, cfg, vocab, tagger)
    assert batch == serial_augment(examples, cfg, vocab, tagger)
    assert len(batch) == len(examples) * 4
    assert {a.kind for a in batch} >= {"original", "mask+pos", "ngram", "mask+pos+ngram"}

    def by_id(outputs):
        return {(a.example_id, a.copy_index): a for a in outputs}

    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    assert by_id(augment_batch(shuffled, cfg, vocab, tagger)) == by_id(batch)
    half = len(examples) // 2
    split = augment_batch(examples[:half], cfg, vocab, tagger) + augment_batch(examples[half:], cfg, vocab, tagger)
    assert split == batch


# --- TinyBERT MLM variant ----------------------------------------------------------------------
_VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] [unused0] the a cat dog sat ran on mat big small hello world "
    "news fire town ##s ##ing ##ed . , ! ?"
).split()


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tinybert")
    (folder / "vocab.txt").write_text("\n".join(_VOCAB) + "\n")
    # A local folder with vocab.txt (transformers 5 silently ignores BertTokenizerFast(vocab_file=...)).
    tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True, do_lower_case=True)
    assert tok.convert_ids_to_tokens(list(range(len(_VOCAB)))) == _VOCAB
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: extra threads only add contention on a busy machine
    yield BertForMaskedLM(config).eval(), tok
    torch.set_num_threads(threads)


def _expected_candidates(model, tok, text, k):
    """Hand computation: logits at each [MASK], whole-word vocabulary only, best first."""
    import torch

    allowed = [i for i, w in enumerate(_VOCAB) if w.isalnum()]  # drops [..], ##.., punctuation
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    rows = []
    for pos in (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist():
        scores = logits[pos, allowed].numpy()
        rows.append([_VOCAB[allowed[j]] for j in np.argsort(-scores, kind="stable")[:k]])
    return rows


def test_mlm_candidates_are_the_teachers_top_whole_words(tiny_mlm):
    model, tok = tiny_mlm
    fn = make_mlm_candidates_fn(model, tok, top_k=4, batch_size=2)
    texts = ["the cat [MASK] on the mat.", "[MASK] dog ran [MASK]!", "hello world"]
    got = fn(texts)
    assert [len(r) for r in got] == [1, 2, 0]
    for text, rows in zip(texts, got):
        assert rows == _expected_candidates(model, tok, text, 4)
    for rows in got:
        for cands in rows:
            assert len(cands) == 4 and all(c.isalnum() and not c.startswith("##") for c in cands)
    # A mask cut off by truncation gets no candidates (the augmenter keeps that word).
    short = make_mlm_candidates_fn(model, tok, top_k=2, max_length=6)
    assert short(["the cat sat on the big mat [MASK]", "[MASK] cat"]) == [[[]], [_expected_candidates(model, tok, "[MASK] cat", 2)[0]]]


@pytest.mark.slow
def test_mlm_replacement_uses_teacher_candidates_and_batch_equals_serial(tiny_mlm, tagger, vocab, lee):
    model, tok = tiny_mlm
    fn = make_mlm_candidates_fn(model, tok, top_k=3)
    cfg = AugmentConfig(copies=2, seed=5, mask_prob=0.1, pos_swap_prob=0.1, ngram_prob=0.0, mlm_replace_prob=0.3, mlm_top_k=3)
    examples = [(i, s) for i, s in enumerate(lee[1][:20])]
    batch = augment_batch(examples, cfg, vocab, tagger, mlm_candidates_fn=fn)
    assert batch == serial_augment(examples, cfg, vocab, tagger, mlm_candidates_fn=fn)
    n_mlm = 0
    for a in batch:
        if a.copy_index == 0 or "mlm" not in a.ops:
            continue
        words = list(tokenize(examples[a.example_id][1]).words)
        mlm_at = [s for s, op in zip(a.source, a.ops) if op == "mlm"]
        masked = words[:]
        for i in mlm_at:
            masked[i] = "[MASK]"
        toks = tokenize(examples[a.example_id][1])
        cands = _expected_candidates(model, tok, detokenize(masked, toks.space_before), 3)
        out_words = tokenize(a.text).words
        for i, cand in zip(mlm_at, cands):
            assert out_words[i].lower() in cand
            n_mlm += 1
    assert n_mlm > 15


@pytest.mark.slow
def test_mlm_fn_result_count_is_checked(tagger):
    cfg = _cfg(copies=1, mlm_replace_prob=1.0)
    with pytest.raises(ValueError, match="^mlm_candidates_fn: expected 1 results, got 0"):
        augment_batch([(0, "the cat sat")], cfg, None, tagger, mlm_candidates_fn=lambda texts: [])
    out = augment_batch([(0, "the cat sat")], cfg, None, tagger, mlm_candidates_fn=lambda t: [[["x"], [], ["Y", "z"]]])
    u = rng.uniform_scalar(rng.copy_key(7, 0, 1), 2, rng.MLM_PICK)
    assert out[1].text == "x cat " + ["Y", "z"][int(u * 2)]
    assert out[1].ops == ("mlm", "keep", "mlm")
