"""Attention-based objectives: TinyBERT attention MSE, MiniLM attention / value-relation KL, MiniLMv2 relations.

Attention tensors are ``(B, H, T, T)`` (query x key); ``mask`` ``(B, T)``. Padded queries never count and
padded keys are excluded (from the MSE) or masked before the softmax / renormalised away (for the KLs).
KL direction is always KL(teacher || student), averaged over heads and real queries, summed over keys.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import fill_invalid, valid_mask
from kdlib.losses.registry import register_loss

TINYBERT_NEG_THRESHOLD = -1e2  # TinyBERT zeroes scores <= -100 (the additive -10000 / -inf mask)


def _pair_valid(valid: Tensor) -> Tensor:
    """(B, T) -> (B, 1, T, T): real query and real key."""
    return (valid.unsqueeze(-1) & valid.unsqueeze(-2)).unsqueeze(1)


def _check_heads(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:3] != teacher.shape[:3]:
        raise ValueError(f"{what}: expected (B, H, T, .) with equal B, H, T; got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)} (different head counts need minilmv2_relations)")


def _row_kl(log_p_t: Tensor, log_p_s: Tensor, valid: Tensor) -> Tensor:
    """sum over real keys of p_t (log p_t - log p_s), averaged over heads and real queries."""
    keys = valid[:, None, None, :]
    p_t = log_p_t.exp()
    terms = torch.where(keys & (p_t > 0), p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    per_query = terms.sum(-1)  # (B, H, T)
    q = valid[:, None, :].expand_as(per_query)
    return torch.where(q, per_query, torch.zeros_like(per_query)).sum() / q.sum().clamp(min=1)


def masked_log_softmax_keys(scores: Tensor, valid: Tensor) -> Tensor:
    """log softmax over keys with padded keys removed (their score set to the dtype's minimum)."""
    keys = valid[:, None, None, :]
    filled = torch.where(keys, scores, torch.full_like(scores, torch.finfo(scores.dtype).min))
    return F.log_softmax(filled, dim=-1)


@register_loss("attention_mse", kind="intermediate", paper="Jiao et al. 2020, TinyBERT (attention-based distillation)")
def attention_mse(student_attention_scores: Tensor, teacher_attention_scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """mean over heads and real (query, key) pairs of (A_s - A_t)^2 on pre-softmax scores, scores <= -100 set to 0 -- Jiao et al. 2020 (TinyBERT)."""
    _check_heads(student_attention_scores, teacher_attention_scores, "attention_mse")
    s, t = student_attention_scores, teacher_attention_scores.detach()
    valid = valid_mask(mask, (s.shape[0], s.shape[2]), s.device)
    pair = _pair_valid(valid).expand_as(s)
    s = torch.where(pair & (s > TINYBERT_NEG_THRESHOLD), s, torch.zeros_like(s))
    t = torch.where(pair & (t > TINYBERT_NEG_THRESHOLD), t, torch.zeros_like(t))
    return ((s - t) ** 2).sum() / pair.sum().clamp(min=1)


@register_loss("attention_kl", kind="intermediate", paper="Wang et al. 2020, MiniLM (self-attention distribution transfer)")
def attention_kl(student_attention_probs: Tensor, teacher_attention_probs: Tensor, mask: Optional[Tensor]) -> Tensor:
    """mean_{h,real q} sum_{real k} A_t log(A_t / A_s) on attention probabilities, padded keys renormalised away -- Wang et al. 2020 (MiniLM)."""
    _check_heads(student_attention_probs, teacher_attention_probs, "attention_kl")
    s, t = student_attention_probs, teacher_attention_probs.detach()
    valid = valid_mask(mask, (s.shape[0], s.shape[2]), s.device)
    pair = _pair_valid(valid).expand_as(s)

    def renorm_log(p: Tensor) -> Tensor:
        p = torch.where(pair, p, torch.zeros_like(p)).clamp(min=0.0)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-12)
        return torch.log(p.clamp(min=1e-12))

    return _row_kl(renorm_log(t), renorm_log(s), valid)


def relation_log_probs(x: Tensor, valid: Tensor) -> Tensor:
    """log softmax(x x^T / sqrt(d)) over real keys for x (B, H, T, d) -- the MiniLM self-relation."""
    scores = torch.matmul(x, x.transpose(-1, -2)) / math.sqrt(x.shape[-1])
    return masked_log_softmax_keys(scores, valid)


@register_loss("value_relation_kl", kind="intermediate", paper="Wang et al. 2020, MiniLM (value-relation transfer)")
def value_relation_kl(student_values: Tensor, teacher_values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """mean_{h,real q} KL(softmax(V_t V_t^T/sqrt(d_t)) || softmax(V_s V_s^T/sqrt(d_s))) per head, padded keys masked -- Wang et al. 2020 (MiniLM).

    Values are per-head (B, H, T, d_head); head counts must match, head widths may differ.
    """
    _check_heads(student_values, teacher_values, "value_relation_kl")
    valid = valid_mask(mask, student_values.shape[:1] + student_values.shape[2:3], student_values.device)
    s = fill_invalid(student_values.transpose(1, 2), valid).transpose(1, 2)
    t = fill_invalid(teacher_values.detach().transpose(1, 2), valid).transpose(1, 2)
    return _row_kl(relation_log_probs(t, valid), relation_log_probs(s, valid), valid)


def split_relation_heads(x: Tensor, relation_heads: int, what: str) -> Tensor:
    """(B, T, D) -> (B, R, T, D/R): MiniLMv2 re-splits the concatenated heads into R relation heads."""
    b, t, d = x.shape
    if d % relation_heads:
        raise ValueError(f"{what}: hidden size {d} is not divisible by relation_heads={relation_heads}")
    return x.reshape(b, t, relation_heads, d // relation_heads).transpose(1, 2)


@register_loss("minilmv2_relations", kind="intermediate",
               paper="Wang et al. 2021, MiniLMv2 (multi-head self-attention relation distillation)")
def minilmv2_relations(student_query: Tensor, student_key: Tensor, student_value: Tensor,
                       teacher_query: Tensor, teacher_key: Tensor, teacher_value: Tensor,
                       mask: Optional[Tensor], *, relation_heads: int = 12) -> Tensor:
    """sum_{X in Q,K,V} mean_{r,real q} KL(softmax(X_t,r X_t,r^T/sqrt(d_r)) || same for student) -- Wang et al. 2021 (MiniLMv2).

    Inputs are concatenated-head projections (B, T, D); both widths are split into ``relation_heads``
    relation heads (so teacher and student attention head counts may differ). MiniLMv2 uses 48 for large teachers.
    """
    if relation_heads < 1:
        raise ValueError(f"relation_heads: expected >= 1, got {relation_heads}")
    valid = valid_mask(mask, student_query.shape[:2], student_query.device)
    total = student_query.new_zeros(())
    for name, s, t in (("query", student_query, teacher_query), ("key", student_key, teacher_key),
                       ("value", student_value, teacher_value)):
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(f"minilmv2_relations {name}: expected matching (B, T), got {tuple(s.shape)} "
                             f"and {tuple(t.shape)}")
        s_r = split_relation_heads(fill_invalid(s, valid), relation_heads, f"student_{name}")
        t_r = split_relation_heads(fill_invalid(t.detach(), valid), relation_heads, f"teacher_{name}")
        total = total + _row_kl(relation_log_probs(t_r, valid), relation_log_probs(s_r, valid), valid)
    return total
