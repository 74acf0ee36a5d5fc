"""Tiny real transformers models, built offline from configs, for tests of every stage.

The vocabulary is real WordPiece: special tokens, the most frequent words of gensim's
lee_background corpus, and single characters (with ## continuations) so any text tokenizes.
"""

from __future__ import annotations

import collections
import re
import string
from pathlib import Path

import torch
from transformers import (BertConfig, BertForMaskedLM, BertForMultipleChoice, BertForSequenceClassification, BertModel,
                          BertTokenizerFast)

from kdlib.text.readers import gensim_test_data

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab(words: int = 400) -> list[str]:
    counts = collections.Counter()
    for line in gensim_test_data("lee_background.cor").read_text(encoding="utf-8").splitlines():
        counts.update(re.findall(r"[a-z]+", line.lower()))
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    common = [w for w, _ in counts.most_common(words) if w not in chars]
    return SPECIAL + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + common


def make_tiny_bert(folder: str | Path, *, task: str = "masked_lm", layers: int = 2, hidden: int = 32, heads: int = 4,
                   intermediate: int = 64, num_labels: int = 2, seed: int = 0, max_positions: int = 128) -> Path:
    """Save a randomly initialised tiny BERT (safetensors) with its tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)  # transformers 5: `vocab`, not `vocab_file`
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=max_positions, num_labels=num_labels)
    torch.manual_seed(seed)
    cls = {"masked_lm": BertForMaskedLM, "base": BertModel, "sequence_classification": BertForSequenceClassification,
           "multiple_choice": BertForMultipleChoice}[task]  # multiple_choice: a head deploy refuses
    model = cls(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_decoder(folder: str | Path, *, family: str = "gpt2", tokenizer: str = "bpe", layers: int = 4,
                      hidden: int = 32, heads: int = 4, intermediate: int = 64, seed: int = 0,
                      max_positions: int = 128, vocab_size: int = 512) -> Path:
    """Save a randomly initialised tiny decoder LM (GPT-2, or a Llama with grouped-query attention) with a
    tokenizer trained on the Wikipedia sample (tests/tiny_tokenizers.py) into `folder`."""
    from teacher.prepare_decoder import decoder_config
    from tests.tiny_tokenizers import make_tokenizer

    folder = Path(folder)
    tok = make_tokenizer(folder, tokenizer, vocab_size)
    config, cls = decoder_config(family, tok, layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                                 max_positions=max_positions)
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
