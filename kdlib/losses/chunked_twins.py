"""Chunked twins of the output losses that read the student's full-vocabulary logits.

Each twin has its loss's exact signature, gets the student logits as `FactoredLogits`, and returns
the `ChunkTerm` that `fused_loss` evaluates: the same positions, the same per-position function and
the same mean as the dense loss (kdlib/losses/topk.py, output.py), without (N, V) tensors. Teacher
rows are indexed chunk by chunk, so dense teacher logits (an online teacher's) are not copied either.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import valid_mask
from kdlib.losses.chunked import ChunkTerm, FactoredLogits, float_temperature
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.registry import register_chunked
from kdlib.losses.topk import _check_shapes, topk_kd_per_position


def _real_rows(logits: FactoredLogits, mask: Optional[Tensor], extra: Optional[Tensor] = None) -> Tensor:
    """Flattened indices of the real positions (and where ``extra`` holds), ascending."""
    keep = valid_mask(mask, logits.shape[:-1], logits.device)
    if extra is not None:
        keep = keep & extra
    return keep.reshape(-1).nonzero().squeeze(-1)


@register_chunked("kd_topk")
def kd_topk_chunked(student_logits: FactoredLogits, topk_ids: Tensor, topk_logits: Tensor, teacher_lse: Tensor,
                    mask: Optional[Tensor], *, temperature: float = 1.0,
                    missing_mass: Literal["renormalize", "rest_bucket"] = "renormalize") -> Optional[ChunkTerm]:
    tau = float_temperature(temperature)
    if tau is None:
        return None
    V, k, _ = _check_shapes(student_logits, topk_ids, topk_logits, teacher_lse)
    rows = _real_rows(student_logits, mask)
    ids = topk_ids.reshape(-1, k)[rows].long()
    if bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"topk_ids: expected ids in [0, {V}) at real positions")
    z, lse = topk_logits.detach().reshape(-1, k)[rows], teacher_lse.detach().reshape(-1)[rows]

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return topk_kd_per_position(s, ids[sl], z[sl].to(s.dtype), lse[sl].to(s.dtype), V - k, tau,
                                    missing_mass).sum()

    return ChunkTerm(rows, chunk_loss, rows.numel())


def _soft_term(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], temperature,
               form: str) -> Optional[ChunkTerm]:
    tau = float_temperature(temperature)
    if tau is None:
        return None
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    rows = _real_rows(student_logits, mask)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return soft_kd_per_position(s, t[rows[sl]].to(s.dtype), tau, form).sum()

    return ChunkTerm(rows, chunk_loss, rows.numel())


@register_chunked("kd_kl")
def kd_kl_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                  temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _soft_term(student_logits, teacher_logits, mask, temperature, "kl")


@register_chunked("kd_ce")
def kd_ce_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                  temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _soft_term(student_logits, teacher_logits, mask, temperature, "ce")


def _label_term(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], ignore_index: int) -> ChunkTerm:
    """Only the labelled rows are read (a masked-LM step labels ~15% of positions)."""
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    rows = _real_rows(student_logits, mask, labels != ignore_index)
    y = labels.reshape(-1)[rows].long()

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return -F.log_softmax(s, dim=-1).gather(-1, y[sl].unsqueeze(-1)).sum()

    return ChunkTerm(rows, chunk_loss, rows.numel())


@register_chunked("mlm_ce")
def mlm_ce_chunked(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], *,
                   ignore_index: int = -100) -> ChunkTerm:
    return _label_term(student_logits, labels, mask, ignore_index)


@register_chunked("hard_ce")
def hard_ce_chunked(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], *,
                    ignore_index: int = -100) -> ChunkTerm:
    return _label_term(student_logits, labels, mask, ignore_index)
