"""Output-layer (logit) objectives: soft-target KD, hard-label CE, logit MSE, MLM CE, teacher annealing.

Logits are ``(..., V)`` (token-level ``(B, T, V)`` or sequence-level ``(B, V)``); ``mask`` has the
leading shape (``(B, T)`` / ``(B,)``) or is None. Every loss is a mean over real positions.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature, fill_invalid, masked_mean, valid_mask
from kdlib.losses.registry import register_loss
from kdlib.losses.schedules import teacher_annealing_lambda, teacher_annealing_targets

Temperature = Union[float, Tensor]


def _tau(temperature: Temperature, like: Tensor) -> Tensor:
    """Temperature broadcastable against ``(..., V)`` logits (per-position tensors get a trailing dim)."""
    if isinstance(temperature, Tensor):
        return temperature.to(like.dtype).unsqueeze(-1)
    return torch.as_tensor(float(temperature), dtype=like.dtype, device=like.device)


def soft_kd_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature,
                         form: str = "kl") -> Tensor:
    """T^2 * KL(p_T^tau || p_S^tau) (form "kl") or T^2 * H(p_T^tau, p_S^tau) (form "ce") per position."""
    tau = _tau(temperature, student_logits)
    log_ps = F.log_softmax(student_logits / tau, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach() / tau, dim=-1)
    pt = log_pt.exp()
    per = (pt * ((log_pt if form == "kl" else 0.0) - log_ps)).sum(-1)
    return per * tau.squeeze(-1) ** 2


def _prep(student_logits: Tensor, teacher_logits: Optional[Tensor], mask: Optional[Tensor]):
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    valid = valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    s = fill_invalid(student_logits, valid)
    t = None if teacher_logits is None else fill_invalid(teacher_logits, valid)
    return s, t, valid


@register_loss("kd_kl", kind="output", class_distribution=True,
               paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
def kd_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *,
          temperature: float = 1.0) -> Tensor:
    """T^2 * mean_pos KL(softmax(z_t/T) || softmax(z_s/T)) -- Hinton, Vinyals & Dean 2015.

    The T^2 factor keeps gradient magnitudes independent of T (the soft-target gradient scales as 1/T^2).
    """
    check_temperature(temperature)
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean(soft_kd_per_position(s, t, temperature, "kl"), valid)


@register_loss("kd_ce", kind="output", class_distribution=True,
               paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
def kd_ce(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *,
          temperature: float = 1.0) -> Tensor:
    """T^2 * mean_pos -sum_v softmax(z_t/T)_v log softmax(z_s/T)_v -- Hinton, Vinyals & Dean 2015.

    Equals kd_kl plus T^2 times the teacher entropy (a constant): same gradients, different value.
    """
    check_temperature(temperature)
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean(soft_kd_per_position(s, t, temperature, "ce"), valid)


def _label_ce(student_logits: Tensor, labels: Tensor, mask: Optional[Tensor], ignore_index: int) -> Tensor:
    """Only the labelled rows reach the log-softmax: a masked-LM step labels ~15% of positions, and the
    full (B, T, V) log-softmax is the largest tensor of the step."""
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    keep = valid_mask(mask, student_logits.shape[:-1], student_logits.device) & (labels != ignore_index)
    picked = student_logits[keep]  # (M, V), row-major order of the kept positions
    nll = -F.log_softmax(picked, dim=-1).gather(-1, labels[keep].long().unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, torch.ones_like(nll, dtype=torch.bool))


@register_loss("hard_ce", kind="output", class_distribution=True,
               paper="standard supervised cross-entropy (Hinton et al. 2015 'hard targets')")
def hard_ce(student_logits: Tensor, labels: Tensor, mask: Optional[Tensor], *, ignore_index: int = -100) -> Tensor:
    """mean_pos -log softmax(z_s)_y over positions with y != ignore_index -- hard-label CE (Hinton et al. 2015)."""
    return _label_ce(student_logits, labels, mask, ignore_index)


@register_loss("mlm_ce", kind="output", paper="Devlin et al. 2019, BERT (masked-LM objective)")
def mlm_ce(student_logits: Tensor, labels: Tensor, mask: Optional[Tensor], *, ignore_index: int = -100) -> Tensor:
    """mean over masked tokens of -log softmax(z_s)_y, labels == -100 ignored -- Devlin et al. 2019 (BERT MLM)."""
    return _label_ce(student_logits, labels, mask, ignore_index)


@register_loss("next_token_ce", kind="output", paper="Radford et al. 2019, GPT-2 (causal language-model objective)")
def next_token_ce(student_logits: Tensor, next_token_labels: Tensor, mask: Optional[Tensor], *,
                  ignore_index: int = -100) -> Tensor:
    """mean over positions t with a real t+1 of -log softmax(z_s[t])_{x[t+1]} -- Radford et al. 2019 (causal LM).

    The targets are the row's own ids shifted by one (kdlib.training.providers: next_token_labels), so the
    last position of a row and positions before padding predict nothing."""
    return _label_ce(student_logits, next_token_labels, mask, ignore_index)


@register_loss("hard_mse", kind="output", paper="standard regression loss on the labels (a one-output head, e.g. STS-B)")
def hard_mse(student_logits: Tensor, labels: Tensor) -> Tensor:
    """mean_rows (z_s[:, 0] - y)^2 over rows with a finite target -- the standard regression loss (e.g. STS-B).

    NaN marks a row without a hard target (an augmented copy that teaches by the teacher's output only)."""
    if student_logits.dim() != 2 or student_logits.shape[-1] != 1 or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"hard_mse: expected student_logits (B, 1) and labels (B,), got "
                         f"{tuple(student_logits.shape)} and {tuple(labels.shape)}")
    y = labels.to(student_logits.dtype)
    keep = torch.isfinite(y)
    diff = torch.where(keep, student_logits[:, 0] - torch.where(keep, y, torch.zeros_like(y)), torch.zeros_like(y))
    return (diff ** 2).sum() / keep.sum().clamp(min=1)


@register_loss("logit_mse", kind="output",
               paper="Tang et al. 2019, Distilling Task-Specific Knowledge from BERT into Simple Neural Networks")
def logit_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor]) -> Tensor:
    """mean_{pos,v} (z_s - z_t)^2 -- Tang et al. 2019 (logit regression, averaged over logits like nn.MSELoss)."""
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean((s - t.detach()) ** 2, valid)


@register_loss("teacher_annealing_ce", kind="output", class_distribution=True,
               paper="Clark et al. 2019, BAM! Born-Again Multi-Task Networks (teacher annealing)")
def teacher_annealing_ce(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mask: Optional[Tensor],
                         step: int, total_steps: int, *, ignore_index: int = -100) -> Tensor:
    """mean_pos -sum_v [lam*onehot(y) + (1-lam)*softmax(z_t)]_v log softmax(z_s)_v, lam=step/total -- Clark et al. 2019.

    Positions whose label is ignore_index fall back to the pure teacher target (lam treated as 0).
    """
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    if labels.shape != s.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(s.shape[:-1])}, got {tuple(labels.shape)}")
    labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    lam = teacher_annealing_lambda(step, total_steps)
    target = teacher_annealing_targets(F.softmax(t.detach(), dim=-1), labels, lam, ignore_index=ignore_index)
    per = -(target * F.log_softmax(s, dim=-1)).sum(-1)
    return masked_mean(per, valid)
