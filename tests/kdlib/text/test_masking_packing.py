"""kdlib.text.packing and kdlib.text.masking, the one packing and the one BERT masking that the data pipeline
and the teacher preparation share: row boundaries by hand, replacements from controlled draws by
hand, and selection rates / the 80-10-10 split of a seeded run within binomial tolerance."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from data_pipeline.rows import TokenizedText, pack_group, row_id
from kdlib.text.masking import MaskingConfig, MaskTokens, mask_tokens, word_starts
from kdlib.text.packing import pack_documents

CLS, SEP, MASK = 1, 2, 4
TOKENS = MaskTokens(mask_id=MASK, vocab_size=500, special_ids=(0, 1, 2, 3, 4))


def doc(ids, starts=None):
    return list(ids), [True] * len(ids) if starts is None else list(starts)


# ---------------------------------------------------------------- packing


def test_documents_are_joined_by_sep_and_cut_into_cls_rows():
    # stream: 10 11 12 SEP 20 21 SEP 30 SEP -> chunks of max_length - 1 = 3
    rows = list(pack_documents([doc([10, 11, 12]), doc([20, 21]), doc([30])], max_length=4, min_length=4,
                               cls_id=CLS, sep_id=SEP))
    assert [r.input_ids.tolist() for r in rows] == [[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 2]]
    assert [r.index for r in rows] == [0, 1, 2]
    assert [r.document for r in rows] == [0, 0, 1]  # a [SEP] belongs to the document it closes
    assert rows[0].input_ids.dtype == np.int32
    assert [r.word_starts.tolist() for r in rows] == [[False, True, True, True], [False, False, True, True],
                                                      [False, False, True, False]]


def test_a_short_tail_is_kept_from_min_length_and_dropped_below():
    docs = [doc([10, 11, 12, 13], [True, False, True, False])]  # stream 10 11 12 13 SEP: chunk + tail of 2
    kept = list(pack_documents(docs, max_length=4, min_length=3, cls_id=CLS, sep_id=SEP))
    assert [r.input_ids.tolist() for r in kept] == [[1, 10, 11, 12], [1, 13, 2]]
    assert kept[1].word_starts.tolist() == [False, False, False] and kept[1].index == 1
    dropped = list(pack_documents(docs, max_length=4, min_length=4, cls_id=CLS, sep_id=SEP))
    assert [r.input_ids.tolist() for r in dropped] == [[1, 10, 11, 12]]
    assert list(pack_documents([], max_length=4, min_length=1, cls_id=CLS, sep_id=SEP)) == []


def test_packing_is_lazy_and_checks_flag_counts():
    endless = (doc([7] * 5) for _ in itertools.count())
    rows = list(itertools.islice(pack_documents(endless, max_length=8, min_length=8, cls_id=CLS, sep_id=SEP), 4))
    assert [r.input_ids.tolist() for r in rows] == [[1, 7, 7, 7, 7, 7, 2, 7], [1, 7, 7, 7, 7, 2, 7, 7],
                                                    [1, 7, 7, 7, 2, 7, 7, 7], [1, 7, 7, 2, 7, 7, 7, 7]]
    with pytest.raises(ValueError, match="document 0: 2 token ids but 1 word-start flags"):
        list(pack_documents([([5, 6], [True])], max_length=8, min_length=1, cls_id=CLS, sep_id=SEP))


def test_pipeline_group_joins_a_documents_units_and_names_rows_by_their_first_document():
    units = [TokenizedText("b#000000", "b", 1, "mask", (30, 31), (True, True)),
             TokenizedText("a#000001", "a", 1, "mask", (12,), (False,)),
             TokenizedText("a#000000", "a", 1, "mask", (10, 11), (True, False))]
    for order in itertools.permutations(units):
        rows = pack_group(list(order), max_length=5, min_length=2, cls_id=CLS, sep_id=SEP)
        # stream: 10 11 12 SEP 30 31 SEP (no [SEP] between the two units of document a)
        assert [r["input_ids"].tolist() for r in rows] == [[1, 10, 11, 12, 2], [1, 30, 31, 2]]
        assert [r["source_id"] for r in rows] == ["a", "b"]
        assert [r["id"] for r in rows] == [row_id("a", "copy1", 0), row_id("b", "copy1", 1)]
        assert {r["augmentation"] for r in rows} == {"copy1"}
        assert rows[0]["word_starts"].tolist() == [False, True, False, False, False]


# ---------------------------------------------------------------- masking


class ScriptedRng:
    """Stands in for numpy's Generator with draws chosen by hand."""

    def __init__(self, uniforms, integers):
        self.uniforms, self.ints = list(uniforms), list(integers)

    def random(self, n):
        out, self.uniforms = self.uniforms[:n], self.uniforms[n:]
        assert len(out) == n
        return np.asarray(out)

    def integers(self, low, high, n, dtype):
        assert (low, high) == (0, TOKENS.vocab_size)
        out, self.ints = self.ints[:n], self.ints[n:]
        return np.asarray(out, dtype=dtype)


def test_token_level_selection_and_replacement_by_hand():
    ids = [1, 10, 11, 12, 13, 2]
    # selection draws per token: [CLS] 10 11 12 13 [SEP]; < 0.5 selects, specials never.
    rng = ScriptedRng([0.1, 0.2, 0.9, 0.3, 0.4, 0.0] + [0.5, 0.85, 0.95], [77, 88, 99])
    masked, positions, labels = mask_tokens(ids, rng, MaskingConfig(prob=0.5, whole_word=False), TOKENS)
    assert positions.tolist() == [1, 3, 4] and labels.tolist() == [10, 12, 13]
    # rolls 0.5 -> [MASK], 0.85 -> random id (the second integer draw), 0.95 -> unchanged
    assert masked.tolist() == [1, MASK, 11, 88, 13, 2]
    assert masked.dtype == positions.dtype == labels.dtype == np.int32


def test_whole_word_selection_by_hand():
    # [CLS] a ##b c ##d [SEP] ##e : pieces after [CLS] / [SEP] start words of their own
    ids = [1, 10, 11, 12, 13, 2, 14]
    starts = [False, False, False, True, False, False, False]
    # words: [CLS] | 10 11 | 12 13 | [SEP] | 14  -> five draws
    rng = ScriptedRng([0.0, 0.1, 0.9, 0.0, 0.2] + [0.0, 0.0, 0.0], [5, 5, 5])
    masked, positions, labels = mask_tokens(ids, rng, MaskingConfig(prob=0.5), TOKENS, starts)
    assert positions.tolist() == [1, 2, 6] and labels.tolist() == [10, 11, 14]
    assert masked.tolist() == [1, MASK, MASK, 12, 13, 2, MASK]
    with pytest.raises(ValueError, match="whole-word masking needs one word-start flag per token"):
        mask_tokens(ids, rng, MaskingConfig(prob=0.5), TOKENS)


def synthetic_row(n_words: int, seed: int):
    """[CLS] + words of 1-3 pieces + [SEP], ids in 10..499."""
    r = random.Random(seed)
    ids, starts = [CLS], [False]
    for _ in range(n_words):
        pieces = r.choice([1, 1, 2, 3])
        ids += [r.randrange(10, 500) for _ in range(pieces)]
        starts += [True] + [False] * (pieces - 1)
    return np.asarray(ids + [SEP]), np.asarray(starts + [False])


@pytest.mark.parametrize("whole_word", [False, True])
def test_seeded_rates_and_the_80_10_10_split(whole_word):
    ids, starts = synthetic_row(40_000, seed=0)
    cfg = MaskingConfig(prob=0.15, whole_word=whole_word)
    masked, positions, labels = mask_tokens(ids, np.random.default_rng(123), cfg, TOKENS, starts)
    again = mask_tokens(ids, np.random.default_rng(123), cfg, TOKENS, starts)
    assert all(np.array_equal(a, b) for a, b in zip((masked, positions, labels), again))
    assert 0 not in positions and len(ids) - 1 not in positions
    assert np.array_equal(labels, ids[positions])
    unselected = np.setdiff1d(np.arange(len(ids)), positions)
    assert np.array_equal(masked[unselected], ids[unselected])

    eligible = len(ids) - 2
    if whole_word:
        word_of = np.cumsum(starts) - 1
        chosen = np.zeros(len(ids), bool)
        chosen[positions] = True
        words = word_of[1:-1]
        per_word = np.bincount(words, weights=chosen[1:-1]) / np.bincount(words)
        assert set(np.unique(per_word)) <= {0.0, 1.0}  # a word is selected with all its pieces
        n, rate = len(per_word), per_word.mean()
    else:
        n, rate = eligible, len(positions) / eligible
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n), rate
    k = len(positions)
    to_mask = (masked[positions] == MASK).mean()
    kept = (masked[positions] == labels).mean()
    random_ = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 4 * np.sqrt(0.8 * 0.2 / k)
    # a random id equals the original with chance 1/500, which then counts as kept
    assert abs(kept - (0.1 + 0.1 / 500)) < 4 * np.sqrt(0.1 * 0.9 / k)
    assert abs(random_ - 0.1 * 499 / 500) < 4 * np.sqrt(0.1 * 0.9 / k)


def test_word_starts_and_mask_tokens_from_a_tokenizer():
    assert word_starts([None, 0, 0, 1, None, 2, 2]) == (False, True, False, True, False, True, False)

    class Tok:
        mask_token_id = 103
        all_special_ids = [102, 0, 101, 103, 100, 0]

        def __len__(self):
            return 30522

    assert MaskTokens.from_tokenizer(Tok()) == MaskTokens(103, 30522, (0, 100, 101, 102, 103))


@pytest.mark.parametrize("fields, message", [
    ({"prob": 1.0}, "prob: expected a probability in"),
    ({"mask_fraction": 1.5}, "mask_fraction: expected a fraction"),
    ({"mask_fraction": 0.8, "random_fraction": 0.3}, "random_fraction: mask_fraction \\+ random_fraction"),
])
def test_masking_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**fields)
