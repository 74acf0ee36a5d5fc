"""Token-level divergences between the teacher's and the student's distributions at temperature T:
reverse KL, generalized Jensen-Shannon, total variation (forward KL is `kd_kl` in output.py).

Notation: p = softmax(z_t / T) (teacher, detached), q = softmax(z_s / T) (student). Each loss takes the
arguments of `kd_kl` (student_logits, teacher_logits, mask; ``temperature``), treats padding the same way
(``_prep``: padded rows replaced before any arithmetic) and averages its per-position value over the
real positions.

Temperature scaling: a loss is multiplied by T^k, k the order in 1/T at which its gradient w.r.t. the
student logits vanishes at high T, so gradient magnitudes do not depend on T (Hinton et al.'s reason for
T^2 on `kd_kl`). KL, reverse KL and JSD are second order (each is (1/2) chi^2-like for p ~ q): T^2.
TVD is first order (its gradient is (1/T) q (sign(q - p) - E_q[sign]) / 2, sign-valued): T, not T^2;
so at T = 1 it is the plain TVD in [0, 1] and at any T it lies in [0, T]. (DistillKit multiplies its
TVD by T^2; at T = 1 the two agree.)

Forward KL is deliberately not registered a second time (no ``forward_kl`` alias): ``kd_kl`` is it, and
two names for one objective would let a config hold the same term twice under different names.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature, masked_mean
from kdlib.losses.output import Temperature, _prep, _tau, soft_kd_per_position
from kdlib.losses.registry import register_loss


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """(log q, log p) at temperature ``tau``; the teacher side is detached."""
    return F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits.detach() / tau, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dimension, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def check_beta(beta) -> float:
    """``beta`` as a float after checking 0 <= beta <= 1 (ValueError naming it otherwise)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: expected a number in [0, 1], got {beta!r}")
    return float(beta)


def reverse_kl_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature) -> Tensor:
    """T^2 * KL(q || p) per position (the student's distribution first)."""
    tau = _tau(temperature, student_logits)
    log_q, log_p = _log_probs(student_logits, teacher_logits, tau)
    return _kl(log_q, log_p) * tau.squeeze(-1) ** 2


def jsd_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature,
                     beta: float) -> Tensor:
    """T^2 * JSD_beta(p, q) per position; beta = 0 / 1 give forward / reverse KL (see `jsd`)."""
    if beta == 0.0:
        return soft_kd_per_position(student_logits, teacher_logits, temperature, "kl")
    if beta == 1.0:
        return reverse_kl_per_position(student_logits, teacher_logits, temperature)
    tau = _tau(temperature, student_logits)
    log_q, log_p = _log_probs(student_logits, teacher_logits, tau)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # m = beta p + (1 - beta) q
    per = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return per * tau.squeeze(-1) ** 2


def tvd_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: Temperature) -> Tensor:
    """T * (1/2) sum_v |q_v - p_v| per position (T^1: see the module docstring)."""
    tau = _tau(temperature, student_logits)
    log_q, log_p = _log_probs(student_logits, teacher_logits, tau)
    return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1) * tau.squeeze(-1)


@register_loss("reverse_kl", kind="output", class_distribution=True,
               paper="Gu et al. 2024, MiniLLM: Knowledge Distillation of Large Language Models (reverse KL); "
                     "token level as in Agarwal et al. 2024 (GKD, arXiv:2306.13649)")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *,
               temperature: float = 1.0) -> Tensor:
    """T^2 * mean_pos KL(softmax(z_s/T) || softmax(z_t/T)) -- reverse KL (Gu et al. 2024 MiniLLM; GKD).

    kd_kl with the distributions' roles swapped: mode seeking (the student is penalised for mass where the
    teacher has little), where forward KL is mode covering. Only the student side carries gradient.
    """
    check_temperature(temperature)
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean(reverse_kl_per_position(s, t, temperature), valid)


@register_loss("jsd", kind="output", class_distribution=True,
               paper="Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD, ICLR; arXiv:2306.13649), "
                     "generalized JSD; convention of TRL's generalized_jsd_loss")
def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *, temperature: float = 1.0,
        beta: float = 0.5) -> Tensor:
    """T^2 * mean_pos [beta KL(p || m) + (1-beta) KL(q || m)], m = beta p + (1-beta) q -- Agarwal et al. 2024 (GKD).

    p = softmax(z_t/T) (teacher), q = softmax(z_s/T) (student); beta weighs the teacher in the mixture m
    and its own KL term (the GKD paper's JSD(beta)(p || q) and TRL's ``generalized_jsd_loss``).
    beta = 0.5 is the symmetric Jensen-Shannon divergence, in [0, ln 2] at T = 1 (0 iff p = q).
    For 0 < beta < 1 the value lies in [0, H(beta)] (H the binary entropy, in nats) and tends to 0 at both
    ends, like beta KL(p || q) as beta -> 0 and like (1-beta) KL(q || p) as beta -> 1. The endpoints are
    therefore defined as those limits divided by their vanishing factor, as TRL does: beta = 0 IS forward
    KL, KL(p || q) (= kd_kl), and beta = 1 IS reverse KL, KL(q || p) (= reverse_kl) -- at full strength,
    so the value jumps there (JSD_beta / beta -> KL(p || q)); scale the weight by beta (or 1 - beta) near
    an end to make it continuous.
    """
    check_temperature(temperature)
    beta = check_beta(beta)
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean(jsd_per_position(s, t, temperature, beta), valid)


@register_loss("tvd", kind="output", class_distribution=True,
               paper="Wen et al. 2023, f-Divergence Minimization for Sequence-Level Knowledge Distillation "
                     "(f-DISTILL, ACL; arXiv:2307.15190), token-level TVD")
def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor], *,
        temperature: float = 1.0) -> Tensor:
    """T * mean_pos (1/2) sum_v |softmax(z_s/T)_v - softmax(z_t/T)_v| -- total variation (Wen et al. 2023).

    In [0, 1] at T = 1 (0 iff the distributions agree, 1 for disjoint supports). Scaled by T, not T^2:
    TVD's gradient vanishes as 1/T at high T (KL's as 1/T^2), see the module docstring. Symmetric in
    its arguments; at q_v = p_v the |.| gets subgradient 0.
    """
    check_temperature(temperature)
    s, t, valid = _prep(student_logits, teacher_logits, mask)
    return masked_mean(tvd_per_position(s, t, temperature), valid)
