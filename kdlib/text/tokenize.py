"""The one tokenizer call for rows: task examples get special tokens and are truncated to max_length;
corpus text gets neither (packing adds the special tokens). The data pipeline builds transfer-set rows
with it and finetune encodes its held-out examples with it, so a held-out example is tokenized exactly
as the same text in a transfer set."""

from __future__ import annotations

from typing import Optional, Sequence


def tokenize_texts(tokenizer, texts: Sequence[str], pairs: Optional[Sequence[str]] = None, *, task: bool,
                   max_length: Optional[int], offsets: bool = False):
    """A BatchEncoding with input_ids (and word_ids()) per text; `pairs` are second segments of pair tasks.

    `offsets`: also each token's (start, end) character span in its text (`offset_mapping`, a fast
    tokenizer's; the ids are the same either way)."""
    extra = {"return_offsets_mapping": True} if offsets else {}
    return tokenizer(list(texts), list(pairs) if pairs is not None else None, add_special_tokens=task,
                     truncation=task, max_length=max_length if task else None, return_attention_mask=False, **extra)
