"""Held-out metrics against the teacher: masked top-1 agreement, KL(teacher || model), pooled cosine.

The teacher runs once (`teacher_reference`); its log-probabilities at the masked positions (float32,
positions x vocabulary: ~150 MB for the default 64 x 128 tokens at 15%) and its pooled embeddings are kept,
and every model is compared with them batch by batch on exactly the same inputs.

* agreement = fraction of masked positions where argmax of the model's logits = the teacher's argmax;
* KL = mean over masked positions of sum_v p_t(v) (log p_t(v) - log p_m(v)), in float64 (0 for the teacher);
* cosine = mean over sequences of cos(teacher pooled, model pooled), pooled = mean of the last hidden state
  over real tokens (kdlib.training.internals.pool) of the *unmasked* sequence; only for equal widths,
  since embeddings of different widths live in different spaces (n/a otherwise).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from kdlib.training.internals import pool
from evaluate.heldout import HeldOut


def padded(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) long ids padded with pad_id, and the (B, T) attention mask."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, :len(r)] = 1
    return ids, mask


def selection(positions: list[np.ndarray], shape: tuple[int, int]) -> torch.Tensor:
    """(B, T) bool: True at each row's masked positions."""
    select = torch.zeros(shape, dtype=torch.bool)
    for i, p in enumerate(positions):
        select[i, torch.from_numpy(np.asarray(p, dtype=np.int64))] = True
    return select


@contextmanager
def _only_selected(model, select: torch.Tensor) -> Iterator[None]:
    """While active, the output projection sees only the selected positions: (B, T, H) -> (N, H).

    The vocabulary projection is most of a small masked LM's cost (30522 x 384 per token for MiniLM) and
    85% of its outputs would be thrown away. Nothing is narrowed for a model without separate output
    embeddings, or whose head reads the projection's weight without calling it (MobileBERT's): the caller
    tells by the logits' shape.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][select],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def masked_log_probs(model, ids: torch.Tensor, mask: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """(N, V) float32 log-softmax of the model's logits at the selected positions (row-major order)."""
    with _only_selected(model, select):
        logits = model(input_ids=ids, attention_mask=mask).logits
    if logits.dim() == 3:  # (B, T, V): the head was not narrowed
        logits = logits[select]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def pooled(encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, H) float64: the last hidden state averaged over real tokens."""
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return pool(hidden.double(), mask, "mean")


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) unmasked
    masked: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) attention mask
    select: torch.Tensor  # (B, T) masked positions


def batches(heldout: HeldOut, size: int, pad_id: int) -> list[Batch]:
    out = []
    for start in range(0, len(heldout.input_ids), size):
        ids, mask = padded(heldout.input_ids[start:start + size], pad_id)
        masked, _ = padded(heldout.masked_ids[start:start + size], pad_id)
        out.append(Batch(ids, masked, mask, selection(heldout.positions[start:start + size], tuple(ids.shape))))
    return out


@dataclass
class Reference:
    """The teacher's outputs on the held-out batches."""

    batches: list[Batch]
    log_probs: Optional[list[torch.Tensor]]  # per batch (N_b, V); None when the teacher has no masked-LM head
    pooled: torch.Tensor  # (S, H) float64


def teacher_reference(teacher, heldout: HeldOut, batch_size: int) -> Reference:
    """Run the teacher (a LoadedModel) once over the held-out batches."""
    todo = batches(heldout, batch_size, teacher.tokenizer.pad_token_id)
    log_probs = ([masked_log_probs(teacher.model, b.masked, b.mask, b.select) for b in todo]
                 if teacher.entry.has_mlm_head else None)
    return Reference(todo, log_probs, torch.cat([pooled(teacher.encoder, b.ids, b.mask) for b in todo]))


def _kl_sum(teacher_lp: torch.Tensor, model_lp: torch.Tensor) -> float:
    """sum over positions of KL(p_t || p_m), float64; a position's zero-probability tokens add 0."""
    t, m = teacher_lp.double(), model_lp.double()
    p = t.exp()
    return float(torch.where(p > 0, p * (t - m), torch.zeros_like(p)).sum())


def compare(loaded, reference: Reference, *, masked_lm: bool, cosine: bool) -> dict:
    """{"masked_top1_agreement", "masked_kl", "pooled_cosine"} of one model (nan where not computed)."""
    agree = total = 0
    kl = 0.0
    cos = []
    for index, b in enumerate(reference.batches):
        if masked_lm:
            lp = masked_log_probs(loaded.model, b.masked, b.mask, b.select)
            t = reference.log_probs[index]
            agree += int((lp.argmax(-1) == t.argmax(-1)).sum())
            total += int(t.shape[0])
            kl += _kl_sum(t, lp)
        if cosine:
            mine = pooled(loaded.encoder, b.ids, b.mask)
            start = sum(int(x.ids.shape[0]) for x in reference.batches[:index])
            theirs = reference.pooled[start:start + mine.shape[0]]
            cos.append(torch.nn.functional.cosine_similarity(mine, theirs, dim=-1))
    return {"masked_top1_agreement": agree / total if masked_lm and total else math.nan,
            "masked_kl": kl / total if masked_lm and total else math.nan,
            "pooled_cosine": float(torch.cat(cos).mean()) if cosine else math.nan}


def self_scores(reference: Reference) -> dict:
    """The teacher against itself, from its stored outputs (no forward pass): 1, 0 and 1 up to rounding."""
    if reference.log_probs is not None:
        total = sum(int(t.shape[0]) for t in reference.log_probs)
        agree = sum(int((t.argmax(-1) == t.argmax(-1)).sum()) for t in reference.log_probs)
        kl = sum(_kl_sum(t, t) for t in reference.log_probs)
    cos = torch.nn.functional.cosine_similarity(reference.pooled, reference.pooled, dim=-1)
    masked_lm = reference.log_probs is not None and total > 0
    return {"masked_top1_agreement": agree / total if masked_lm else math.nan,
            "masked_kl": kl / total if masked_lm else math.nan, "pooled_cosine": float(cos.mean())}
