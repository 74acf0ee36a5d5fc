"""KD from a cached top-k teacher distribution (ids, logits at those ids, full-vocabulary log-sum-exp).

Notation per position: teacher logits z (only z_K at the k cached ids K are known), lse = log sum_v e^{z_v}
(stored at T = 1), p_i = e^{z_i - lse}; teacher missing mass r = 1 - sum_{i in K} p_i; student
q = softmax(s/T) over the full vocabulary V, student rest mass r_s = 1 - sum_{i in K} q_i; n = V - k.

missing_mass="renormalize": the teacher is replaced by its renormalisation over K,
    p~_i = softmax(z_K / T)_i (zero outside K), and the loss is T^2 * KL(p~ || q) against the *full*
    student distribution. Exact at any T (softmax over K needs no lse); teacher_lse is unused.
missing_mass="rest_bucket": the vocabulary is lumped into K plus one "rest" bucket; teacher bucket mass
    is r, student bucket mass r_s (computed exactly as a log-sum-exp over the student's logits outside K);
    loss T^2 * [sum_K p_i log(p_i / q_i) + r log(r / r_s)].
    At T != 1 the tempered teacher needs sum_{j not in K} e^{z_j / T}, which a T=1 lse cannot give.
    APPROXIMATION: we assume the missing mass R = e^{lse} * r is spread evenly over the n missing ids
    (the maximum-entropy tail), so sum_{j not in K} e^{z_j/T} ~= n * (R/n)^{1/T}. This is exact at T = 1
    and whenever the tail is flat; for T > 1 it is the upper end of the feasible range
    [R * m^{1/T - 1}, n^{1 - 1/T} R^{1/T}] (m = smallest cached prob e^{min z_K}; Jensen), i.e. it
    over-estimates the tempered rest mass of a peaked tail; for T < 1 it is the lower end.
With k = V (n = 0) both modes equal dense kd_kl at every T.

Error bound for k < V at T = 1 (per position; the batch mean obeys the mean of the bounds), with
C = logsumexp_{j not in K} s_j - min_{j not in K} s_j (<= log n + student logit range on the tail):
    rest_bucket:  0 <= KD_dense - KD_rest = r * KL(p|rest || q|rest) <= r * C
    renormalize:  KD_dense - KD_renorm = -r KD_renorm + (1-r) log(1-r) + r log(r/r_s) + r KL(p|rest || q|rest)
                  so |KD_dense - KD_renorm| <= r * (KD_renorm + 1 + |log(r / r_s)| + C)
Both vanish linearly with the missing mass r; `topk_kd_error_bound` computes them.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature, fill_invalid, masked_mean, valid_mask
from kdlib.losses.registry import register_loss

MISSING_MASS_MODES = ("renormalize", "rest_bucket")


def _check_shapes(student_logits, topk_ids, topk_logits, teacher_lse):
    """(V, k, leading shape) after checking the four tensors belong together."""
    V, k = student_logits.shape[-1], topk_ids.shape[-1]
    lead = student_logits.shape[:-1]
    if topk_ids.shape[:-1] != lead or topk_logits.shape != topk_ids.shape or teacher_lse.shape != lead:
        raise ValueError(f"topk_ids/topk_logits: expected {tuple(lead)} + (k,), teacher_lse: expected "
                         f"{tuple(lead)}; got {tuple(topk_ids.shape)}, {tuple(topk_logits.shape)}, "
                         f"{tuple(teacher_lse.shape)}")
    if k > V:
        raise ValueError(f"topk_ids: expected k <= V={V}, got k={k}")
    return V, k, lead


def _prepare(student_logits, topk_ids, topk_logits, teacher_lse, mask):
    V, k, lead = _check_shapes(student_logits, topk_ids, topk_logits, teacher_lse)
    valid = valid_mask(mask, lead, student_logits.device)
    ids = torch.where(valid.unsqueeze(-1), topk_ids.long(),
                      torch.arange(k, device=topk_ids.device).expand_as(topk_ids))
    if bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"topk_ids: expected ids in [0, {V}) at real positions")
    s = fill_invalid(student_logits, valid)
    z = fill_invalid(topk_logits.detach(), valid)
    lse = fill_invalid(teacher_lse.detach(), valid)
    return s, ids, z, lse, valid, V - k


def _teacher_log_rest(z: Tensor, lse: Tensor, n: int) -> Tensor:
    """log r with r = 1 - sum_K e^{z - lse}, clamped to [0, 1] (-inf when r == 0 or n == 0)."""
    if n == 0:
        return torch.full_like(lse, -math.inf)
    log_in = torch.logsumexp(z - lse.unsqueeze(-1), dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(log_in))


def _student_log_rest(log_q: Tensor, ids: Tensor, log_q_k: Tensor | None = None) -> Tensor:
    """log r_s = log of the student's probability outside K; needs n >= 1.

    Cheap path: r_s = 1 - sum_K q_i from the k gathered values (no pass over V). Where that sum is
    close to 1 the subtraction loses precision, so those rows (r_s < 1e-2) take the exact path, a
    log-sum-exp over the other V - k ids.
    """
    if log_q_k is None:
        log_q_k = log_q.gather(-1, ids)
    log_in = torch.logsumexp(log_q_k, dim=-1).clamp(max=0.0)
    close = log_in > math.log1p(-1e-2)
    cheap = torch.log(-torch.expm1(torch.where(close, torch.full_like(log_in, -1.0), log_in)))
    if not bool(close.any()):
        return cheap
    exact = torch.logsumexp(log_q[close].scatter(-1, ids[close], -math.inf), dim=-1)
    return cheap.masked_scatter(close, exact)


def _xlog_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p * (log_p - log_q) with the 0 * log 0 = 0 convention, NaN-free in forward and backward."""
    pos = p > 0
    diff = torch.where(pos, log_p, torch.zeros_like(log_p)) - torch.where(pos, log_q, torch.zeros_like(log_q))
    return torch.where(pos, p * diff, torch.zeros_like(p))


def _topk_kd_parts(s: Tensor, ids: Tensor, z: Tensor, lse: Tensor, n: int, temperature: float,
                   missing_mass: str) -> dict:
    """The per-position loss ("per", without the T^2) and the intermediates its gradient reuses."""
    tau = float(temperature)
    log_q = F.log_softmax(s / tau if tau != 1.0 else s, dim=-1)  # one pass over V; no copy at T = 1
    log_q_k = log_q.gather(-1, ids)
    if missing_mass == "renormalize":
        log_p_k = F.log_softmax(z / tau, dim=-1)
        return {"per": (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1), "log_q": log_q, "log_q_k": log_q_k,
                "log_p_k": log_p_k}
    if missing_mass != "rest_bucket":
        raise ValueError(f"missing_mass: expected one of {list(MISSING_MASS_MODES)}, got {missing_mass!r}")
    log_r = _teacher_log_rest(z, lse, n)
    if n > 0:  # uniform-tail estimate of log sum_{j not in K} e^{z_j / T} (exact at T = 1)
        log_rest_t = (1.0 - 1.0 / tau) * math.log(n) + (lse + log_r) / tau
    else:
        log_rest_t = log_r
    lse_t = torch.logsumexp(torch.cat([z / tau, log_rest_t.unsqueeze(-1)], dim=-1), dim=-1)
    log_p_k = z / tau - lse_t.unsqueeze(-1)
    per = (log_p_k.exp() * (log_p_k - log_q_k)).sum(-1)
    out = {"log_q": log_q, "log_q_k": log_q_k, "log_p_k": log_p_k}
    if n > 0:
        log_p_rest = log_rest_t - lse_t
        log_r_s = _student_log_rest(log_q, ids, log_q_k)
        per = per + _xlog_ratio(log_p_rest.exp(), log_p_rest, log_r_s)
        out.update(log_p_rest=log_p_rest, log_r_s=log_r_s)
    out["per"] = per
    return out


def topk_kd_per_position(s: Tensor, ids: Tensor, z: Tensor, lse: Tensor, n: int, temperature: float,
                         missing_mass: str) -> Tensor:
    """Per-position T^2 * KL of the module docstring (inputs already sanitised)."""
    return _topk_kd_parts(s, ids, z, lse, n, temperature, missing_mass)["per"] * float(temperature) ** 2


@torch.no_grad()
def topk_kd_value_and_grad(s: Tensor, ids: Tensor, z: Tensor, lse: Tensor, n: int, temperature: float,
                           missing_mass: str) -> tuple[Tensor, Tensor]:
    """(per-position loss, its gradient with respect to s) in closed form, for the chunked output layer.

    With q = softmax(s/T), the teacher's (tempered, bucketed) p_k on K and p_rest on the rest bucket, and
    the student's rest mass r_s: d loss / d s_j = T * (q_j - p_j) on K, and T * (q_j - p_rest q_j / r_s)
    outside K (renormalize: p_rest = 0). q_j / r_s = exp(log q_j - log r_s) is formed in log space, so a
    student that puts almost nothing outside K still gets its tail gradient. Tested against autograd
    through topk_kd_per_position in float64.
    """
    tau = float(temperature)
    parts = _topk_kd_parts(s, ids, z, lse, n, tau, missing_mass)
    log_q = parts["log_q"]
    on_k = parts["log_q_k"].exp() - parts["log_p_k"].exp()
    if "log_r_s" in parts:  # rest bucket: every id outside K, then K overwritten
        grad = torch.sub(log_q, parts["log_r_s"].unsqueeze(-1)).exp_()  # q_j / r_s (inf on K is overwritten)
        grad.mul_((parts["log_r_s"].exp() - parts["log_p_rest"].exp()).unsqueeze(-1))
    else:
        grad = log_q.exp() if missing_mass == "renormalize" and n > 0 else torch.zeros_like(log_q)
    grad.scatter_(-1, ids, on_k)
    return parts["per"] * tau ** 2, grad.mul_(tau)


@register_loss("kd_topk", kind="output",
               paper="Hinton et al. 2015 KD on a sparse (top-k) cached teacher; see topk.py for the missing-mass treatment")
def kd_topk(student_logits: Tensor, topk_ids: Tensor, topk_logits: Tensor, teacher_lse: Tensor,
            mask: Optional[Tensor], *, temperature: float = 1.0,
            missing_mass: Literal["renormalize", "rest_bucket"] = "renormalize") -> Tensor:
    """T^2 * mean_pos KL(p_teacher restricted to top-k (+rest bucket) || softmax(z_s/T)) -- Hinton et al. 2015, top-k cache.

    Shapes: student_logits (B,T,V); topk_ids, topk_logits (B,T,k); teacher_lse (B,T) at T=1; mask (B,T).
    """
    check_temperature(temperature)
    V, k, lead = _check_shapes(student_logits, topk_ids, topk_logits, teacher_lse)
    valid = valid_mask(mask, lead, student_logits.device)
    # Index the real positions first: padding never enters any arithmetic, and no (B,T,V) copy is made
    # beyond the (N,V) selection itself.
    s, ids = student_logits[valid], topk_ids[valid].long()
    z, lse = topk_logits.detach()[valid], teacher_lse.detach()[valid]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    if bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"topk_ids: expected ids in [0, {V}) at real positions")
    return topk_kd_per_position(s, ids, z, lse, V - k, temperature, missing_mass).mean()


@torch.no_grad()
def topk_kd_error_bound(student_logits: Tensor, topk_ids: Tensor, topk_logits: Tensor, teacher_lse: Tensor,
                        mask: Optional[Tensor], *,
                        missing_mass: Literal["renormalize", "rest_bucket"] = "renormalize") -> Tensor:
    """Upper bound on |kd_topk - kd_kl(dense)| at T = 1: mean over real positions of the per-position bounds."""
    s, ids, z, lse, valid, n = _prepare(student_logits, topk_ids, topk_logits, teacher_lse, mask)
    if n == 0:
        return torch.zeros((), dtype=s.dtype, device=s.device)
    log_r = _teacher_log_rest(z, lse, n)
    r = log_r.exp()
    rest_s = s.scatter(-1, ids, math.inf)  # +inf marks the cached ids for the min below
    c = torch.logsumexp(s.scatter(-1, ids, -math.inf), -1) - rest_s.amin(-1)
    if missing_mass == "rest_bucket":
        bound = r * c
    else:
        log_q = F.log_softmax(s, dim=-1)
        kd_renorm = topk_kd_per_position(s, ids, z, lse, n, 1.0, "renormalize")
        log_ratio = torch.where(r > 0, (log_r - _student_log_rest(log_q, ids)).abs(), torch.zeros_like(r))
        bound = r * (kd_renorm + 1.0 + log_ratio + c)
    return masked_mean(bound, valid)
