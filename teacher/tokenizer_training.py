"""Tokenizers trained offline with the `tokenizers` library, saved as plain transformers tokenizer folders.

No decoder (or its vocabulary) can be downloaded here, so the decoder teacher and any cross-tokenizer student
get a vocabulary trained on the corpus they will read. Two kinds:

- bpe: byte-level BPE, GPT-2 style (no unknown characters, leading spaces inside tokens); eos = bos = pad =
  <|endoftext|>, GPT-2's convention.
- wordpiece: lower-casing, accent-stripping WordPiece, BERT style ([UNK] for characters outside its alphabet of
  60); BERT's special tokens, [SEP] ending documents and [CLS] as bos.

Training is deterministic for a given sequence of lines and vocabulary size. tests/tiny_tokenizers.py trains
its test tokenizers with these functions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "wordpiece")
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDPIECE_ALPHABET = 60  # most distinct characters a WordPiece keeps (the rest become [UNK])
MIN_VOCAB = {"bpe": 300, "wordpiece": 100}  # bpe starts from 256 byte symbols + <|endoftext|>


def check_vocab(kind: str, vocab_size: int, name: str = "vocab_size") -> None:
    """ValueError naming `name` unless `kind` is known and `vocab_size` leaves room for merges / word pieces."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind: expected bpe or wordpiece, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB[kind]:
        raise ValueError(f"{name}: expected an integer >= {MIN_VOCAB[kind]} for a {kind} tokenizer, got {vocab_size!r}")
    if vocab_size > 65535:
        raise ValueError(f"{name}: expected at most 65535 (cached top-k ids are uint16), got {vocab_size}")


def train_tokenizer(lines: Iterable[str], kind: str, vocab_size: int, reproducible: bool = True):
    """A `tokenizers.Tokenizer` of `kind` trained on `lines` (an iterable of texts) up to `vocab_size` entries.

    A byte-level BPE is the same on every run. The `tokenizers` WordPiece trainer is not (`_canonical_wordpiece`);
    `reproducible` fixes its alphabet and renumbers its entries, False keeps the trainer's own output."""
    lines = list(lines)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)  # offsets exclude the leading space
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, limit_alphabet=WORDPIECE_ALPHABET,
                                            initial_alphabet=_alphabet(tok.normalizer, lines, WORDPIECE_ALPHABET)
                                            if reproducible else [],
                                            show_progress=False, special_tokens=list(WORDPIECE_SPECIALS))
    else:
        raise ValueError(f"kind: expected bpe or wordpiece, got {kind!r}")
    tok.train_from_iterator(lines, trainer=trainer)
    if kind == "wordpiece" and reproducible:
        tok.model = _canonical_wordpiece(tok)
    return tok


def _alphabet(normalizer, lines: list[str], size: int) -> list[str]:
    """The `size` most frequent characters of the normalised lines (ties: the lower code point first).

    The trainer keeps its `limit_alphabet` most frequent characters but breaks ties in hash-map order, so equally
    rare characters at the limit were in one run and out in the next; given as its initial alphabet (which it
    always keeps) this fixed choice is the one kept."""
    counts = Counter()
    for line in lines:
        counts.update(normalizer.normalize_str(line))
    ranked = sorted((c for c in counts if not c.isspace()), key=lambda c: (-counts[c], ord(c)))
    return ranked[:size]


def _canonical_wordpiece(tok):
    """The trained WordPiece with ids in a fixed order: the special tokens, then every other entry sorted.

    The trainer gives the `##` continuation alphabet ids in hash-map order, which changes from run to run (and
    with it the order of equally frequent merges), so the same lines gave other ids every time. WordPiece
    encodes by greedy longest match over the entries, never by their ids, so renumbering keeps every
    tokenization and makes the ids reproducible whenever the entries are: they are unless two merges tie
    for the last places (rare merges on a small corpus).
    """
    vocab = tok.get_vocab(with_added_tokens=False)
    order = list(WORDPIECE_SPECIALS) + sorted(t for t in vocab if t not in WORDPIECE_SPECIALS)
    return models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]", continuing_subword_prefix="##",
                            max_input_chars_per_word=100)


def special_tokens(kind: str) -> dict:
    """The transformers special-token arguments of a tokenizer kind (see the module docstring)."""
    if kind == "bpe":
        return dict(bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    if kind == "wordpiece":
        return dict(bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    raise ValueError(f"kind: expected bpe or wordpiece, got {kind!r}")


def save_tokenizer(folder: str | Path, tokenizer, kind: str):
    """Save a trained `tokenizers.Tokenizer` (a copy: the caller's object is left as it is) into `folder` as a
    fast transformers tokenizer that `AutoTokenizer` loads; returns that transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast  # ~1.2 s to import; training a tokenizer does not need it

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.__class__.from_str(tokenizer.to_str()),
                                   **special_tokens(kind))
    fast.save_pretrained(str(folder))
    return fast
