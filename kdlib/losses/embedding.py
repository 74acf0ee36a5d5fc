"""Sentence-embedding objectives: distil a sentence-embedding teacher (e.g. all-MiniLM-L6-v2) as such.

Inputs are per-sequence pooled embeddings ``(N, D)`` (``student_pooled``, ``teacher_pooled``), already
pooled with the mask, so there is no mask here. The losses that compare a student vector with a teacher
vector take the optional ``projection`` (student width -> teacher width, the trainer's "hidden" one); the
relation KL compares each model's own similarity structure, so widths may differ without one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._masking import check_temperature
from kdlib.losses.intermediate import project
from kdlib.losses.registry import register_loss


def _pair(student: Tensor, teacher: Tensor, what: str, min_n: int = 1) -> tuple[Tensor, Tensor]:
    """Shape checks; returns (student, detached teacher)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: expected (N, D) pooled embeddings with equal N, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[0] < min_n:
        raise ValueError(f"{what}: expected at least {min_n} sequences in the batch, got {student.shape[0]}")
    return student, teacher.detach()


def _projected(student: Tensor, teacher: Tensor, projection: Optional[nn.Module], what: str,
               min_n: int = 1) -> tuple[Tensor, Tensor]:
    s, t = _pair(student, teacher, what, min_n)
    return project(s, t.shape[-1], projection, what), t


@register_loss("pooled_mse", kind="output",
               paper="Reimers & Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual using KD")
def pooled_mse(student_pooled: Tensor, teacher_pooled: Tensor, projection: Optional[nn.Module] = None) -> Tensor:
    """mean_{i,d} (s_i W - t_i)^2 over sequences and units, W optional learned projection -- Reimers & Gurevych 2020."""
    s, t = _projected(student_pooled, teacher_pooled, projection, "pooled_mse")
    return ((s - t) ** 2).mean()


@register_loss("pooled_cosine", kind="output",
               paper="Sanh et al. 2019, DistilBERT (cosine embedding loss), on pooled sentence embeddings")
def pooled_cosine(student_pooled: Tensor, teacher_pooled: Tensor, projection: Optional[nn.Module] = None) -> Tensor:
    """mean_i 1 - cos(s_i W, t_i), W optional learned projection -- Sanh et al. 2019 (DistilBERT L_cos) on sentence embeddings.

    Cosine ignores scale but still pairs unit d with unit d, so differing widths need ``projection``.
    """
    s, t = _projected(student_pooled, teacher_pooled, projection, "pooled_cosine")
    return (1.0 - (F.normalize(s, dim=-1) * F.normalize(t, dim=-1)).sum(-1)).mean()


@register_loss("pooled_contrastive", kind="relational",
               paper="Gao et al. 2021, DistilCSE (arXiv:2112.05638), Contrastive Knowledge Distillation (CKD)")
def pooled_contrastive(student_pooled: Tensor, teacher_pooled: Tensor, projection: Optional[nn.Module] = None, *,
                       temperature: float = 0.05, symmetric: bool = False) -> Tensor:
    """mean_i -log softmax_j(cos(s_i W, t_j)/tau)[i] over the batch (InfoNCE, positive = own teacher embedding) -- Gao et al. 2021 (DistilCSE CKD).

    Negatives are the teacher embeddings of the batch's other sequences (in-batch, as SimCSE; tau = 0.05 is
    SimCSE's and sentence-transformers' default). ``symmetric`` averages in the teacher-to-student direction,
    -log softmax_j(cos(t_i, s_j W)/tau)[i]. Needs N >= 2 (with one sequence there is no negative).
    """
    check_temperature(temperature)
    s, t = _projected(student_pooled, teacher_pooled, projection, "pooled_contrastive", min_n=2)
    logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / temperature  # (N, N): student i vs teacher j
    target = torch.arange(s.shape[0], device=s.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def _relation_log_probs(x: Tensor, temperature: float) -> Tensor:
    """(N, N-1): log softmax over j != i of cos(x_i, x_j)/tau (the diagonal removed, not masked)."""
    n = x.shape[0]
    u = F.normalize(x, dim=-1)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    sim = (u @ u.T)[off].view(n, n - 1) / temperature
    return F.log_softmax(sim, dim=-1)


@register_loss("pooled_relation_kl", kind="relational",
               paper="Abbasi Koohpayegani et al. 2020, CompRess (similarity-to-anchors KL), batch as anchors")
def pooled_relation_kl(student_pooled: Tensor, teacher_pooled: Tensor, *, temperature: float = 0.05) -> Tensor:
    """mean_i KL(softmax_{j!=i}(cos(t_i,t_j)/tau) || softmax_{j!=i}(cos(s_i,s_j)/tau)) -- Abbasi Koohpayegani et al. 2020 (CompRess).

    The anchors are the batch's other sequences, each model with its own (CompRess's two-queue variant), so
    widths may differ. No T^2 factor: tau sharpens cosines here, it does not soften logits. Needs N >= 3
    (with two sequences each distribution has one entry and the loss is identically 0).
    """
    check_temperature(temperature)
    s, t = _pair(student_pooled, teacher_pooled, "pooled_relation_kl", min_n=3)
    log_q = _relation_log_probs(s, temperature)
    with torch.no_grad():
        log_p = _relation_log_probs(t, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
