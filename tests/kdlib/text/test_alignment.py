"""Character-span alignment of a byte-level BPE teacher and a WordPiece student (kdlib.text.alignment).

The expected spans below were written by hand from the tokenizers' printed offsets and the rules in
kdlib/text/alignment.py: 'é' is two BPE byte pieces sharing one span, a bare 'Ġ' (empty span) and a tab /
newline token (whitespace only) are zero-width and prefix the next span, [UNK] covers what BPE spells
in bytes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kdlib.text.alignment import DEFAULT_PROBE, Span, align_spans, alignment_problem, coverage, span_ends
from kdlib.errors import KDError
from tests.tiny_tokenizers import make_tokenizer, wikipedia_lines


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_tokenizers")
    return make_tokenizer(root / "bpe", "bpe"), make_tokenizer(root / "wordpiece", "wordpiece")


def _encode(tokenizer, text):
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"]), encoded["offset_mapping"]


HAND_ALIGNED = {
    "Café naïve über": [
        (["C"], ["c"]), (["a"], ["##a"]), (["f"], ["##f"]), (["Ã", "©"], ["##e"]),
        (["Ġn"], ["n"]), (["a"], ["##a"]), (["Ã", "¯", "v", "e"], ["##ive"]),
        (["Ġ", "Ã", "¼"], ["u"]), (["ber"], ["##ber"]),
    ],
    "12,500 in 1999": [
        (["1"], ["1"]), (["2"], ["##2"]), ([","], [","]), (["5"], ["5"]), (["00"], ["##00"]),
        (["Ġin"], ["in"]), (["Ġ19", "9"], ["199"]), (["9"], ["##9"]),
    ],
    "one  two\tthree\nfour": [
        (["on", "e"], ["one"]), (["Ġ", "Ġt", "w"], ["tw"]), (["o"], ["##o"]),
        (["ĉ", "th"], ["th"]), (["ree"], ["##ree"]), (["Ċ", "f"], ["f"]), (["our"], ["##our"]),
    ],
    "a ☃ snow!": [
        (["a"], ["a"]), (["Ġ", "â", "ĺ", "ĥ"], ["[UNK]"]), (["Ġs"], ["s"]), (["n", "ow"], ["##now"]),
        (["!"], ["!"]),
    ],
    "Hello, world! (yes)...": [
        (["H", "el", "lo"], ["he", "##ll", "##o"]), ([","], [","]), (["Ġwor"], ["wor"]), (["ld"], ["##ld"]),
        (["!"], ["!"]), (["Ġ("], ["("]), (["y"], ["y"]), (["es"], ["##es"]), ([")"], [")"]),
        (["."], ["."]), (["."], ["."]), (["."], ["."]),
    ],
}

HAND_CHARS = {
    "Café naïve über": ["C", "a", "f", "é", "n", "a", "ïve", "ü", "ber"],
    "one  two\tthree\nfour": ["one", "tw", "o", "th", "ree", "f", "our"],
    "a ☃ snow!": ["a", "☃", "s", "now", "!"],
}


@pytest.mark.parametrize("text", list(HAND_ALIGNED))
def test_hand_made_alignments_with_real_tokenizers(tokenizers, text):
    bpe, wordpiece = tokenizers
    t_tokens, t_offsets = _encode(bpe, text)
    s_tokens, s_offsets = _encode(wordpiece, text)
    spans = align_spans(text, t_offsets, s_offsets)
    got = [(t_tokens[s.teacher_begin:s.teacher_end], s_tokens[s.student_begin:s.student_end]) for s in spans]
    assert got == HAND_ALIGNED[text]
    if text in HAND_CHARS:
        assert [text[s.char_begin:s.char_end] for s in spans] == HAND_CHARS[text]
    assert coverage(text, spans) == 1.0


def test_synthetic_offsets_cover_every_rule():
    text = "ab cd é!"  # a0 b1 _2 c3 d4 _5 é6 !7
    teacher = [(0, 1), (1, 2), (2, 2), (3, 5), (5, 6), (6, 7), (6, 7), (7, 8), (8, 8)]
    #          a       b       empty   cd      space   é byte  é byte  !       trailing eos
    student = [(0, 0), (0, 2), (3, 4), (4, 5), (5, 7), (7, 8), (0, 0)]
    #          [CLS]   ab      c       d       " é"    !       [SEP] reported as (0, 0)
    spans = align_spans(text, teacher, student)
    assert spans == [
        Span(0, 2, 0, 2, 0, 2),  # a b | [CLS] ab: the leading zero-width token prefixes the first span
        Span(2, 4, 2, 4, 3, 5),  # (empty) cd | c d
        Span(4, 7, 4, 5, 6, 7),  # (space) é é | " é": overlapping pieces never split
        Span(7, 8, 5, 6, 7, 8),  # ! | !; the trailing eos and [SEP] are in no span
    ]
    teacher_last, student_last = span_ends(spans)
    np.testing.assert_array_equal(teacher_last, np.array([1, 3, 6, 7]))
    np.testing.assert_array_equal(student_last, np.array([1, 3, 4, 5]))
    assert teacher_last.dtype == np.int64 and student_last.dtype == np.int64
    # a token nested inside an earlier one does not end the run early
    assert align_spans("abcdef", [(0, 5), (1, 3), (5, 6)], [(0, 3), (3, 5), (5, 6)]) == [
        Span(0, 2, 0, 2, 0, 5), Span(2, 3, 2, 3, 5, 6)]
    # numpy offsets give the same answer
    assert align_spans(text, np.array(teacher), np.array(student)) == spans
    assert align_spans(text, tuple(teacher), student) == spans


def test_identical_tokenizations_give_one_span_per_token():
    text = "the cat sat."
    offsets = [(0, 3), (3, 7), (7, 11), (11, 12)]  # leading spaces inside tokens, GPT-2 style
    spans = align_spans(text, offsets, offsets)
    assert spans == [Span(0, 1, 0, 1, 0, 3), Span(1, 2, 1, 2, 4, 7), Span(2, 3, 2, 3, 8, 11),
                     Span(3, 4, 3, 4, 11, 12)]
    assert [text[s.char_begin:s.char_end] for s in spans] == ["the", "cat", "sat", "."]
    # whitespace-only tokens on both sides at the same place never form a span of their own
    tabbed = [(0, 2), (2, 3), (3, 5), (5, 6)]  # ab, tab, cd, newline
    assert align_spans("ab\tcd\n", tabbed, tabbed) == [Span(0, 1, 0, 1, 0, 2), Span(1, 3, 1, 3, 3, 5)]


def test_characters_one_side_lacks_yield_no_span():
    text = "ab cd ef"
    spans = align_spans(text, [(0, 2), (3, 5), (6, 8)], [(0, 2), (6, 8)])  # student dropped "cd"
    assert spans == [Span(0, 1, 0, 1, 0, 2), Span(2, 3, 1, 2, 6, 8)]
    assert coverage(text, spans) == pytest.approx(4 / 6)
    # a gap inside one teacher token: nothing between the common boundaries aligns
    assert align_spans("abcde", [(0, 5)], [(0, 2), (3, 5)]) == []
    assert align_spans("abcde", [(0, 2), (3, 5)], [(0, 5)]) == []
    assert coverage("abcde", []) == 0.0
    assert coverage(" \t", []) == 1.0
    assert align_spans("abc", [], [(0, 3)]) == []


def test_span_ends_hand_example():
    spans = [Span(0, 3, 0, 1, 0, 4), Span(3, 4, 1, 3, 5, 9)]
    teacher_last, student_last = span_ends(spans)
    assert teacher_last.tolist() == [2, 3] and student_last.tolist() == [0, 2]
    empty_t, empty_s = span_ends([])
    assert empty_t.shape == (0,) and empty_s.dtype == np.int64


@pytest.mark.parametrize("side,teacher,student,message", [
    ("teacher", [(0, 2), (3, 5), (1, 2)], [(0, 5)], "teacher token 2: offsets (1, 2) start before"),
    ("student", [(0, 5)], [(0, 2), (2, 9)], "student token 1: offsets (2, 9) lie outside"),
    ("student", [(0, 5)], [(-1, 2)], "student token 0: offsets (-1, 2) lie outside"),
])
def test_bad_offsets_raise_naming_side_and_token(side, teacher, student, message):
    with pytest.raises(KDError, match=message.replace("(", r"\(").replace(")", r"\)")):
        align_spans("ab cd", teacher, student)


def _positive_tokens(text, offsets):
    return [k for k, (a, b) in enumerate(offsets) if a < b and text[a:b].strip()]


def _chars(text, offsets, begin, end):
    return {i for a, b in offsets[begin:end] for i in range(a, b) if not text[i].isspace()}


def test_wikipedia_lines_partition_tokens_and_agree_on_characters(tokenizers):
    bpe, wordpiece = tokenizers
    lines = [line for line in wikipedia_lines() if len(line) > 40][:50]
    assert len(lines) == 50
    spans_seen = 0
    for text in lines:
        t_offsets = _encode(bpe, text)[1]
        s_offsets = _encode(wordpiece, text)[1]
        spans = align_spans(text, t_offsets, s_offsets)
        assert coverage(text, spans) == 1.0
        for side_offsets, begin, end in ((t_offsets, 0, 1), (s_offsets, 2, 3)):
            owned = [k for s in spans for k in range(s[begin], s[end])]
            assert owned == sorted(set(owned))  # in order, no token twice
            positive = set(_positive_tokens(text, side_offsets))
            assert positive <= set(owned)  # every positive-width token in exactly one span
            assert all(s[end] - 1 in positive for s in spans)  # a span ends on content, not a space
        previous_end = -1
        for s in spans:
            chars = {i for i in range(s.char_begin, s.char_end) if not text[i].isspace()}
            assert _chars(text, t_offsets, s.teacher_begin, s.teacher_end) == chars
            assert _chars(text, s_offsets, s.student_begin, s.student_end) == chars
            assert s.char_begin >= previous_end and s.char_begin < s.char_end
            previous_end = s.char_end
        spans_seen += len(spans)
    assert spans_seen > 1000


def test_speed_of_a_128_token_row(tokenizers):
    bpe, wordpiece = tokenizers
    text = max(wikipedia_lines(), key=len)
    t_offsets = _encode(bpe, text)[1][:128]
    s_offsets = _encode(wordpiece, text)[1][:128]
    start = time.perf_counter()
    for _ in range(200):
        spans = align_spans(text, t_offsets, s_offsets)
    per_row = (time.perf_counter() - start) / 200
    print(f"align_spans: {per_row * 1e6:.0f} us per 128-token row, {len(spans)} spans")
    assert len(spans) > 50


def test_alignment_problem_accepts_both_fast_tokenizers(tokenizers):
    bpe, wordpiece = tokenizers
    assert alignment_problem(bpe) is None
    assert alignment_problem(wordpiece) is None
    for tokenizer in tokenizers:  # the default probe holds the tricky pieces and aligns fully
        assert coverage(DEFAULT_PROBE, align_spans(DEFAULT_PROBE, _encode(bpe, DEFAULT_PROBE)[1],
                                                   _encode(tokenizer, DEFAULT_PROBE)[1])) == 1.0


def test_alignment_problem_refuses_a_slow_tokenizer(tokenizers, tmp_path):
    from transformers import BertTokenizerLegacy

    vocab = sorted(tokenizers[1].get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    reason = alignment_problem(slow)
    assert reason is not None and "BertTokenizerLegacy is a slow" in reason


class _FakeTokenizer:
    """Stands in for a tokenizer whose offsets are broken in a given way."""

    def __init__(self, offsets=None, error=None):
        self.offsets, self.error = offsets, error

    def __call__(self, text, **kwargs):
        if self.error is not None:
            raise self.error
        return {"input_ids": list(range(len(self.offsets))), "offset_mapping": self.offsets}


@pytest.mark.parametrize("fake,expected", [
    (_FakeTokenizer(offsets=[(0, 0)] * 6), "_FakeTokenizer returned 6 tokens whose offsets are all empty"),
    (_FakeTokenizer(offsets=[(0, 4), (5, 9), (2, 3)]), "token 2: offsets (2, 3) start before"),
    (_FakeTokenizer(offsets=[(0, 4), (5, 500)]), "token 1: offsets (5, 500) lie outside the text"),
    (_FakeTokenizer(offsets=[(0, 1)] * 20), "cover only 2% of the probe's characters"),
    (_FakeTokenizer(error=NotImplementedError("no offsets")), "cannot return character offsets "
                                                               "(NotImplementedError: no offsets)"),
    (_FakeTokenizer(offsets=[(0, 1, 2)]), "not (start, end) pairs"),
])
def test_alignment_problem_names_the_reason(fake, expected):
    reason = alignment_problem(fake)
    assert reason is not None and expected in reason
