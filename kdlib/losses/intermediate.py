"""Hidden-state objectives: TinyBERT hidden/embedding MSE, DistilBERT cosine, BERT-PKD, FSP, NST.

Hidden states are ``(B, T, D)`` with ``mask`` ``(B, T)``. Student/teacher width mismatch is bridged by a
learned ``projection`` (an ``nn.Module`` mapping student width -> teacher width, owned and optimised by the
trainer; build one with ``make_projection``). It is a runtime input, not a config option.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlib.losses._masking import fill_invalid, masked_mean, valid_mask
from kdlib.losses.registry import register_loss


def make_projection(student_dim: int, teacher_dim: int) -> nn.Linear:
    """TinyBERT's W_h: a learned nn.Linear(student_dim -> teacher_dim) the trainer owns and optimises."""
    if student_dim < 1 or teacher_dim < 1:
        raise ValueError(f"dims: expected positive, got student_dim={student_dim}, teacher_dim={teacher_dim}")
    return nn.Linear(student_dim, teacher_dim)


def project(student: Tensor, teacher_dim: int, projection: Optional[nn.Module], what: str) -> Tensor:
    """Apply ``projection`` to the last dim of ``student``; ValueError if widths still differ."""
    out = student if projection is None else projection(student)
    if out.shape[-1] != teacher_dim:
        raise ValueError(f"{what}: student width {out.shape[-1]} != teacher width {teacher_dim}; "
                         f"pass projection=make_projection({student.shape[-1]}, {teacher_dim})")
    return out


def _pair(student: Tensor, teacher: Tensor, mask: Optional[Tensor], projection, what: str):
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"{what}: expected matching leading shapes, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    valid = valid_mask(mask, student.shape[:-1], student.device)
    s = project(fill_invalid(student, valid), teacher.shape[-1], projection, what)
    t = fill_invalid(teacher.detach(), valid)
    return s, t, valid


@register_loss("hidden_mse", kind="intermediate", paper="Jiao et al. 2020, TinyBERT (hidden-state loss)")
def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Optional[Tensor],
               projection: Optional[nn.Module] = None) -> Tensor:
    """mean_{pos,d} (H_s W_h - H_t)^2 over real tokens, W_h optional learned projection -- Jiao et al. 2020 (TinyBERT)."""
    s, t, valid = _pair(student_hidden, teacher_hidden, mask, projection, "hidden_mse")
    return masked_mean((s - t) ** 2, valid)


@register_loss("embedding_mse", kind="intermediate", paper="Jiao et al. 2020, TinyBERT (embedding-layer loss)")
def embedding_mse(student_embeddings: Tensor, teacher_embeddings: Tensor, mask: Optional[Tensor],
                  projection: Optional[nn.Module] = None) -> Tensor:
    """mean_{pos,d} (E_s W_e - E_t)^2 over real tokens, W_e optional learned projection -- Jiao et al. 2020 (TinyBERT)."""
    s, t, valid = _pair(student_embeddings, teacher_embeddings, mask, projection, "embedding_mse")
    return masked_mean((s - t) ** 2, valid)


@register_loss("distilbert_cosine", kind="intermediate", paper="Sanh et al. 2019, DistilBERT (cosine embedding loss)")
def distilbert_cosine(student_hidden: Tensor, teacher_hidden: Tensor, mask: Optional[Tensor],
                      projection: Optional[nn.Module] = None) -> Tensor:
    """mean over real tokens of 1 - cos(h_s, h_t) -- Sanh et al. 2019 (DistilBERT L_cos, attention-masked positions only)."""
    s, t, valid = _pair(student_hidden, teacher_hidden, mask, projection, "distilbert_cosine")
    return masked_mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8), valid)


def _stack(x: Union[Tensor, Sequence[Tensor]], dim: int) -> Tensor:
    return x if isinstance(x, Tensor) else torch.stack(list(x), dim=dim)


@register_loss("pkd_patient", kind="intermediate", paper="Sun et al. 2019, Patient Knowledge Distillation (BERT-PKD)")
def pkd_patient(student_cls: Union[Tensor, Sequence[Tensor]], teacher_cls: Union[Tensor, Sequence[Tensor]],
                projection: Optional[nn.Module] = None) -> Tensor:
    """mean_{b,l,d} (h_s/|h_s|_2 - h_t/|h_t|_2)^2 over [CLS] states of mapped layers -- Sun et al. 2019 (BERT-PKD).

    Inputs are (B, L, D) (or length-L lists of (B, D)), layers already paired by a layer map. Averaging over
    all elements follows the official BERT-PKD code (F.mse_loss); the paper's sum differs by a constant.
    """
    s, t = _stack(student_cls, 1), _stack(teacher_cls, 1).detach()
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(f"pkd_patient: expected matching (B, L), got {tuple(s.shape)} and {tuple(t.shape)}")
    s = project(s, t.shape[-1], projection, "pkd_patient")
    return ((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).mean()


def fsp_matrix(first: Tensor, second: Tensor, valid: Tensor) -> Tensor:
    """G = F1^T F2 / n_tokens per sample: (B, T, D1), (B, T, D2) -> (B, D1, D2), padded tokens excluded."""
    f1, f2 = fill_invalid(first, valid), fill_invalid(second, valid)
    n = valid.sum(-1).clamp(min=1).to(first.dtype)
    return torch.einsum("btd,bte->bde", f1, f2) / n.view(-1, 1, 1)


@register_loss("fsp", kind="intermediate", paper="Yim et al. 2017, A Gift from Knowledge Distillation (FSP matrix)")
def fsp(student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor,
        mask: Optional[Tensor], projection: Optional[nn.Module] = None) -> Tensor:
    """mean (G_s - G_t)^2 with G = F1^T F2 / T (flow between two layers, T real tokens) -- Yim et al. 2017 (FSP).

    Widths must agree (Yim et al. pair layers of equal channel count) or ``projection`` maps both student layers.
    """
    valid = valid_mask(mask, student_first.shape[:-1], student_first.device)
    dt = teacher_first.shape[-1]
    s1 = project(fill_invalid(student_first, valid), dt, projection, "fsp")
    s2 = project(fill_invalid(student_second, valid), teacher_second.shape[-1], projection, "fsp")
    g_s = fsp_matrix(s1, s2, valid)
    g_t = fsp_matrix(teacher_first.detach(), teacher_second.detach(), valid)
    return ((g_s - g_t) ** 2).mean()


@register_loss("nst_mmd", kind="intermediate", paper="Huang & Wang 2017, Like What You Like: Neuron Selectivity Transfer")
def nst_mmd(student_hidden: Tensor, teacher_hidden: Tensor, mask: Optional[Tensor], *,
            degree: int = 2, c: float = 0.0) -> Tensor:
    """mean_b MMD^2 between neuron sets, k(x,y)=(x^T y + c)^d, neurons = L2-normalised per-channel token vectors -- Huang & Wang 2017 (NST).

    MMD^2 = mean_{i,i'} k(t_i,t_i') + mean_{j,j'} k(s_j,s_j') - 2 mean_{i,j} k(s_j,t_i); widths may differ.
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"nst_mmd: expected matching (B, T), got {tuple(student_hidden.shape)} "
                         f"and {tuple(teacher_hidden.shape)}")
    valid = valid_mask(mask, student_hidden.shape[:-1], student_hidden.device)
    s = F.normalize(fill_invalid(student_hidden, valid), dim=1)  # each neuron's vector over tokens
    t = F.normalize(fill_invalid(teacher_hidden.detach(), valid), dim=1)

    def k(a: Tensor, b: Tensor) -> Tensor:
        return (torch.einsum("btd,bte->bde", a, b) + c) ** degree

    mmd = k(t, t).mean((1, 2)) + k(s, s).mean((1, 2)) - 2.0 * k(s, t).mean((1, 2))
    return mmd.mean()
