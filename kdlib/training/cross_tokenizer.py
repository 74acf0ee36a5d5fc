"""Batches for a student with its own tokenizer, from a transfer set that kept its text (char_offsets).

The teacher's rows hold its token ids, its cached top-k and, per token, the character span it covers.
Per row, the student's tokenizer encodes the same text (its own end-of-document token at each document
break), `kdlib.text.alignment` pairs the two tokenizations on character spans, and the teacher's cached values
at the last token of each span are placed at the student's last token of that span: both are next-token
distributions after the same characters. `aligned_mask` marks those positions; the losses that read it
(`uld`) never see the teacher's ids, which mean nothing in the student's vocabulary.

Everything here is a function of the row and the two tokenizers, so the batches (and a resumed run) are
exactly reproducible.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kdlib.text.alignment import align_spans, span_ends

# What a cross-tokenizer batch carries from the teacher: values per position, vocabulary-free
ALIGNED_TEACHER_KEYS = ("topk_logits", "teacher_lse")
ALIGNED_KEYS = frozenset(ALIGNED_TEACHER_KEYS + ("aligned_mask",))


def student_encoding(tokenizer, text: str, breaks, max_length: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The student's ids and character spans for one row's text: each document piece encoded alone (no
    special tokens), the student's end-of-document token (an empty span) before every piece after the first,
    cut to `max_length` tokens."""
    cuts = [0, *[int(b) for b in breaks], len(text)]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        if i:
            ids.append(tokenizer.eos_token_id)
            spans.append((start, start))
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        spans.extend((start + a, start + b) for a, b in enc["offset_mapping"])
    return ids[:max_length], spans[:max_length]


class AlignedBatches:
    """`batch(teacher_batch) -> student batch`: input_ids / attention_mask in the student's tokenization,
    the teacher's `ALIGNED_TEACHER_KEYS` at the aligned student positions, `aligned_mask`, and
    `aligned_teacher_top1` (the teacher's top-1 id there, -1 elsewhere) for evaluation."""

    def __init__(self, tokenizer, *, max_length: int, pad_id: Optional[int] = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the student tokenizer has no end-of-document (eos) token to mark document breaks")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
        self.aligned_fraction = 0.0  # of the last batch: aligned student positions / real student positions

    def __call__(self, teacher: dict) -> dict:
        encoded = [student_encoding(self.tokenizer, text, breaks, self.max_length)
                   for text, breaks in zip(teacher["texts"], teacher["text_breaks"])]
        B, T = len(encoded), max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        aligned = torch.zeros((B, T), dtype=torch.long)
        out = {key: torch.zeros((B, T) + tuple(teacher[key].shape[2:]), dtype=teacher[key].dtype)
               for key in ALIGNED_TEACHER_KEYS if key in teacher}
        top1 = torch.full((B, T), -1, dtype=torch.long)
        teacher_lengths = teacher["attention_mask"].sum(1).tolist()
        for b, (ids, spans) in enumerate(encoded):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, :len(ids)] = 1
            length = int(teacher_lengths[b])
            t_last, s_last = span_ends(align_spans(teacher["texts"][b], teacher["char_offsets"][b][:length], spans))
            t, s = torch.from_numpy(t_last), torch.from_numpy(s_last)
            aligned[b, s] = 1
            for key in out:
                out[key][b, s] = teacher[key][b, t]
            if "topk_ids" in teacher:
                top1[b, s] = teacher["topk_ids"][b, t, 0].long()
        self.aligned_fraction = float(aligned.sum()) / max(int(attention_mask.sum()), 1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "aligned_mask": aligned,
                "aligned_teacher_top1": top1, **out}


def piece_texts(tokenizer) -> np.ndarray:
    """Each id's text with surrounding whitespace removed (object array): what "the same next piece" compares
    across two vocabularies."""
    return np.asarray([tokenizer.decode([i]).strip() for i in range(len(tokenizer))], dtype=object)
