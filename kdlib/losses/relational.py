"""Relational KD over the samples of a batch (Park et al. 2019) and deep mutual learning (Zhang et al. 2018).

RKD inputs are per-sample embeddings ``(N, D)`` (e.g. pooled [CLS] states; widths may differ between
student and teacher). They are not token-level, so there is no mask: pool with the mask first.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import fill_invalid, masked_mean, valid_mask
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.registry import register_loss


def _check_batch(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: expected (N, D) embeddings with equal N, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[0] < 3:
        raise ValueError(f"{what}: expected at least 3 samples in the batch, got {student.shape[0]}")


def normalized_distances(x: Tensor) -> Tensor:
    """psi_D: off-diagonal pairwise Euclidean distances (N*(N-1),) divided by their mean (Park et al. 2019)."""
    n = x.shape[0]
    sq = ((x.unsqueeze(0) - x.unsqueeze(1)) ** 2).sum(-1)
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    d = sq[off].clamp(min=1e-12).sqrt()
    return d / d.mean().clamp(min=1e-12)


def triplet_angles(x: Tensor) -> Tensor:
    """psi_A: cos of angle at vertex j, <e_ji, e_jk> with e_ji = (x_i-x_j)/|x_i-x_j|, over distinct (i, j, k)."""
    n = x.shape[0]
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)  # e[j, i] = unit(x_i - x_j)
    cos = torch.einsum("jid,jkd->jik", e, e)
    idx = torch.arange(n, device=x.device)
    j, i, k = torch.meshgrid(idx, idx, idx, indexing="ij")
    distinct = (i != j) & (k != j) & (i != k)
    return cos[distinct]


@register_loss("rkd_distance", kind="relational", paper="Park et al. 2019, Relational Knowledge Distillation (distance-wise)")
def rkd_distance(student_pooled: Tensor, teacher_pooled: Tensor) -> Tensor:
    """mean_{i!=j} Huber(|s_i-s_j|/mu_s, |t_i-t_j|/mu_t), mu = mean pairwise distance, Huber delta=1 -- Park et al. 2019 (RKD-D)."""
    _check_batch(student_pooled, teacher_pooled, "rkd_distance")
    with torch.no_grad():
        t = normalized_distances(teacher_pooled.detach())
    return F.smooth_l1_loss(normalized_distances(student_pooled), t, beta=1.0)


@register_loss("rkd_angle", kind="relational", paper="Park et al. 2019, Relational Knowledge Distillation (angle-wise)")
def rkd_angle(student_pooled: Tensor, teacher_pooled: Tensor) -> Tensor:
    """mean_{distinct i,j,k} Huber(cos angle s_i s_j s_k, cos angle t_i t_j t_k), Huber delta=1 -- Park et al. 2019 (RKD-A)."""
    _check_batch(student_pooled, teacher_pooled, "rkd_angle")
    with torch.no_grad():
        t = triplet_angles(teacher_pooled.detach())
    return F.smooth_l1_loss(triplet_angles(student_pooled), t, beta=1.0)


@register_loss("dml", kind="mutual", class_distribution=True, paper="Zhang et al. 2018, Deep Mutual Learning")
def dml(logits_a: Tensor, logits_b: Tensor, labels: Tensor, mask: Optional[Tensor], *,
        ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """L_a = CE(z_a, y) + KL(sg(p_b) || p_a), L_b = CE(z_b, y) + KL(sg(p_a) || p_b); returns (L_a, L_b) -- Zhang et al. 2018 (DML).

    Each student's KL target is the other's detached distribution, so L_a only trains student a.
    """
    if logits_a.shape != logits_b.shape or labels.shape != logits_a.shape[:-1]:
        raise ValueError(f"dml: expected logits_a, logits_b (..., C) of equal shape and labels (...); got "
                         f"{tuple(logits_a.shape)}, {tuple(logits_b.shape)}, {tuple(labels.shape)}")
    valid = valid_mask(mask, logits_a.shape[:-1], logits_a.device)
    a, b = fill_invalid(logits_a, valid), fill_invalid(logits_b, valid)
    keep = valid & (labels != ignore_index)
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long().unsqueeze(-1)

    def ce(z: Tensor) -> Tensor:
        return masked_mean(-F.log_softmax(z, dim=-1).gather(-1, safe).squeeze(-1), keep)

    kl_a = masked_mean(soft_kd_per_position(a, b.detach(), 1.0, "kl"), valid)
    kl_b = masked_mean(soft_kd_per_position(b, a.detach(), 1.0, "kl"), valid)
    return ce(a) + kl_a, ce(b) + kl_b
