"""Held-out top-1 agreement with the teacher (and a causal student's next-token perplexity), and a logits
probe for checking the export.

Every rank evaluates the same held-out rows (under ZeRO-3 every rank must run each forward, since
the parameters are gathered collectively); the rows are the last `eval_rows` of the transfer set,
which the sampler never hands out. `load(indices)` is the stage's batch loader (collated CPU tensors).
"""

from __future__ import annotations

import math

import torch


def metric_names(causal: bool) -> tuple[str, ...]:
    """What each held-out evaluation reports (the train job's `evaluate`), so early_stopping.metric is checked
    against it before training rather than at the first evaluation."""
    return ("top1_agreement", "perplexity") if causal else ("top1_agreement",)


def batches(load, indices: list[int], size: int, device):
    for start in range(0, len(indices), size):
        batch = load(indices[start:start + size])
        yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def teacher_top1(batch: dict) -> torch.Tensor:
    """(B, T) the teacher's top-1 id: the cached top-k's first, else the id of largest sampled weight."""
    if "topk_ids" in batch:
        return batch["topk_ids"][..., 0]
    return batch["sparse_ids"].gather(-1, batch["sparse_weights"].argmax(-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def held_out_ratio(student, load, indices: list[int], size: int, device, count) -> float:
    """sum of count(batch, logits)[0] over sum of [1] on the held-out rows, in eval mode (restored after)."""
    was_training = student.training
    student.eval()
    top = bottom = 0.0
    for batch in batches(load, indices, size, device):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        a, b = count(batch, logits)
        top, bottom = top + a, bottom + b
    student.train(was_training)
    return top / max(bottom, 1)


def top1_agreement(student, load, indices: list[int], size: int, device) -> float:
    """Fraction of real positions where argmax of the student's logits equals the teacher's top-1 id (a cache of
    teacher draws only, without a top-k, knows it by its most drawn id: the sparse estimate's argmax)."""
    def count(batch, logits):
        real = batch["attention_mask"].bool()
        return int(((logits.argmax(-1) == teacher_top1(batch)) & real).sum()), int(real.sum())

    return held_out_ratio(student, load, indices, size, device, count)


def piece_agreement(student, load, indices: list[int], size: int, device, teacher_pieces, student_pieces) -> float:
    """A student with its own tokenizer: the fraction of aligned positions where the text of the student's
    top-1 next token equals the text of the teacher's (whitespace stripped), e.g. "the" and "Ġthe"."""
    def count(batch, logits):
        at = batch["aligned_mask"].bool()
        mine = student_pieces[logits.argmax(-1)[at].cpu().numpy()]
        theirs = teacher_pieces[batch["aligned_teacher_top1"][at].cpu().numpy()]
        return int((mine == theirs).sum()), int(at.sum())

    return held_out_ratio(student, load, indices, size, device, count)


def next_token_perplexity(student, load, indices: list[int], size: int, device) -> float:
    """exp of the mean held-out -log q(x[t+1] | x[..t]) over positions whose next token is real (causal students):
    what the student's own language model is worth, beside how often it agrees with the teacher."""
    def count(batch, logits):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        keep = mask[:, 1:] & mask[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float()[keep], ids[:, 1:][keep], reduction="sum")
        return float(nll), int(keep.sum())

    return math.exp(held_out_ratio(student, load, indices, size, device, count))


@torch.no_grad()
def probe_logits(student, load, indices: list[int], device) -> dict:
    """input_ids, attention_mask and the student's fp32 logits on a fixed held-out batch."""
    was_training = student.training
    student.eval()
    batch = next(batches(load, indices, len(indices), device))
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    student.train(was_training)
    return {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu(),
            "logits": logits.cpu().contiguous()}
