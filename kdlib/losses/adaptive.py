"""Teacher-supervision adjustments of Wen et al. 2019 ("Preparing Lessons", arXiv:1911.07471), as in TextBrewer.

* Probability shift (knowledge adjustment): where the teacher's argmax is not the gold label, swap the
  teacher's top logit with the gold label's logit, so the gold class becomes the teacher's top class
  while the distribution's shape (the set of logit values) is kept.
* Dynamic temperature (DTD): a per-position temperature tau_i = T0 + beta * (mean_j w_j - w_i), where
  the mean runs over real (non-padded) positions of the batch and
    flsw: w_i = (1 - <z_s/|z_s|, z_t/|z_t|>)^gamma   (focal-loss-style weight: student/teacher disagreement)
    cwsm: w_i = 1 / (max_v softmax(z_s)_v + 1e-3)    (confidence-weighted by the student's max probability)
  so hard positions (large w) get a lower temperature (sharper targets). tau is clamped to >= 0.01 and
  computed without gradient. Unlike TextBrewer we keep the per-position tau^2 factor of kd_kl.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from kdlib.losses._masking import check_temperature, fill_invalid, masked_mean, valid_mask
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.registry import register_loss

MIN_DYNAMIC_TEMPERATURE = 0.01


def probability_shift(teacher_logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Copy of teacher_logits (..., V) where, per position, the argmax logit and the gold-label logit are swapped."""
    t = teacher_logits.detach()
    keep = labels != ignore_index
    gold = torch.where(keep, labels, torch.zeros_like(labels)).long().unsqueeze(-1)
    top = t.argmax(dim=-1, keepdim=True)
    top_val, gold_val = t.gather(-1, top), t.gather(-1, gold)
    shifted = t.scatter(-1, top, gold_val).scatter(-1, gold, top_val)
    return torch.where(keep.unsqueeze(-1), shifted, t)


def flsw_weights(student_logits: Tensor, teacher_logits: Tensor, *, gamma: float = 2.0, eps: float = 1e-4) -> Tensor:
    """w = (1 - cos(z_s, z_t))^gamma per position (Wen et al. 2019 FLSW; TextBrewer's eps-guarded norms)."""
    v = student_logits / (student_logits.norm(dim=-1, keepdim=True) + eps)
    t = teacher_logits / (teacher_logits.norm(dim=-1, keepdim=True) + eps)
    return (1.0 - (v * t).sum(-1)).clamp(min=0.0) ** gamma


def cwsm_weights(student_logits: Tensor) -> Tensor:
    """w = 1 / (max_v softmax(z_s)_v + 1e-3) per position (Wen et al. 2019 CWSM, TextBrewer constant)."""
    return 1.0 / (torch.softmax(student_logits, dim=-1).amax(dim=-1) + 1e-3)


def dynamic_temperature(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor, *, temperature: float,
                        method: str, beta: float, gamma: float) -> Tensor:
    """Per-position tau = T0 + beta * (masked_mean(w) - w), clamped >= 0.01; padded positions get T0."""
    with torch.no_grad():
        s, t = student_logits.detach(), teacher_logits.detach()
        if method == "flsw":
            w = flsw_weights(s, t, gamma=gamma)
        elif method == "cwsm":
            w = cwsm_weights(s)
        else:
            raise ValueError(f"method: expected 'flsw' or 'cwsm', got {method!r}")
        tau = temperature + beta * (masked_mean(w, valid) - w)
        tau = torch.where(valid, tau, torch.full_like(tau, temperature))
        return tau.clamp(min=MIN_DYNAMIC_TEMPERATURE)


@register_loss("kd_prob_shift", kind="output", class_distribution=True,
               paper="Wen et al. 2019, Preparing Lessons: Improve KD with Better Supervision (probability shift)")
def kd_prob_shift(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mask: Optional[Tensor], *,
                  temperature: float = 1.0, ignore_index: int = -100) -> Tensor:
    """T^2 * mean_pos KL(softmax(shift(z_t, y)/T) || softmax(z_s/T)), shift swaps top and gold logits -- Wen et al. 2019."""
    check_temperature(temperature)
    valid = valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    s, t = fill_invalid(student_logits, valid), fill_invalid(teacher_logits, valid)
    labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    shifted = probability_shift(t, labels, ignore_index=ignore_index)
    return masked_mean(soft_kd_per_position(s, shifted, temperature, "kl"), valid)


@register_loss("kd_dynamic_temperature", kind="output", class_distribution=True,
               paper="Wen et al. 2019, Preparing Lessons (dynamic temperature distillation; TextBrewer flsw/cwsm)")
def kd_dynamic_temperature(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *,
                           temperature: float = 1.0, method: Literal["flsw", "cwsm"] = "flsw",
                           beta: float = 1.0, gamma: float = 2.0) -> Tensor:
    """mean_pos tau_i^2 KL(softmax(z_t/tau_i) || softmax(z_s/tau_i)), tau_i = T + beta*(mean w - w_i) -- Wen et al. 2019."""
    check_temperature(temperature)
    valid = valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    s, t = fill_invalid(student_logits, valid), fill_invalid(teacher_logits, valid)
    tau = dynamic_temperature(s, t, valid, temperature=temperature, method=method, beta=beta, gamma=gamma)
    return masked_mean(soft_kd_per_position(s, t, tau, "kl"), valid)
