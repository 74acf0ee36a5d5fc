"""Tokenizers trained offline with the `tokenizers` library on the Wikipedia sample, for decoder and
cross-tokenizer tests: a byte-level BPE (GPT-2 style: no unknown characters, leading spaces inside
tokens) and a lower-casing, accent-stripping WordPiece (BERT style: [UNK] for characters outside its
alphabet). Both are saved as plain transformers tokenizer folders, so `AutoTokenizer` loads them.

Training is deterministic for a given text and vocabulary size; each is trained once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kdlib.readers import CorpusConfig, read_corpus

EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def wikipedia_lines(documents: int = 40) -> tuple[str, ...]:
    """Non-empty lines of the first `documents` pages of gensim's Wikipedia sample."""
    docs = read_corpus(CorpusConfig(kind="wikipedia_xml", max_documents=documents))
    return tuple(line for d in docs for line in d.text.split("\n") if line.strip())


@functools.lru_cache(maxsize=4)
def _trained(kind: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, limit_alphabet=60, show_progress=False,
                                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    else:
        raise ValueError(f"kind: expected bpe or wordpiece, got {kind!r}")
    tok.train_from_iterator(wikipedia_lines(), trainer=trainer)
    return tok


def make_tokenizer(folder: str | Path, kind: str = "bpe", vocab_size: int = 512):
    """Train (once per process) and save a fast tokenizer into `folder`; returns the transformers tokenizer.

    bpe: eos = bos = pad = <|endoftext|> (GPT-2's convention); wordpiece: BERT's special tokens, with
    [SEP] as the end-of-document token and [CLS] as bos."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        specials = dict(bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    else:
        specials = dict(bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained(kind, vocab_size).__class__.from_str(
        _trained(kind, vocab_size).to_str()), **specials)
    tokenizer.save_pretrained(folder)
    return tokenizer
