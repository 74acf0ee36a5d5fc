"""Chunked twins of the output losses that read the student's full-vocabulary logits.

(`kd_sparse` included: the sampled cache's loss; and `reverse_kl`, `jsd`, `tvd` of divergences.py.) Each
twin has its loss's exact signature, gets the student logits as `FactoredLogits`, and returns the
`ChunkTerm` that `fused_loss` evaluates: the same positions, the same per-position function and the same
mean as the dense loss (kdlib/losses/topk.py, output.py, divergences.py), without (N, V) tensors.
Teacher rows are indexed chunk by chunk, so dense teacher logits (an online teacher's) are not copied
either.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import valid_mask
from kdlib.losses.chunked import ChunkTerm, FactoredLogits, float_temperature, fused_loss
from kdlib.losses.divergences import check_beta, jsd_per_position, reverse_kl_per_position, tvd_per_position
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.registry import register_chunked
from kdlib.losses.sparse import sparse_kd_per_position
from kdlib.losses.topk import MISSING_MASS_MODES, _check_shapes, topk_kd_per_position, topk_kd_value_and_grad


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

    def value_and_grad(s: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        per, grad = topk_kd_value_and_grad(s, ids[sl], z[sl].to(s.dtype), lse[sl].to(s.dtype), V - k, tau,
                                           missing_mass)
        return per.sum(), grad

    return ChunkTerm(rows, chunk_loss, rows.numel(), value_and_grad)


def _teacher_rows(student_logits: FactoredLogits, teacher_logits: Tensor,
                  mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(the real rows, the detached teacher logits as (N, V)) after checking the teacher's shape."""
    if tuple(teacher_logits.shape) != tuple(student_logits.shape):
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    return _real_rows(student_logits, mask), teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])


def _soft_term(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], temperature,
               form: str) -> Optional[ChunkTerm]:
    tau = float_temperature(temperature)
    if tau is None:
        return None
    rows, t = _teacher_rows(student_logits, teacher_logits, mask)

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return soft_kd_per_position(s, t[rows[sl]].to(s.dtype), tau, form).sum()

    @torch.no_grad()
    def value_and_grad(s: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """d/ds of T^2 KL(p_T || q_T) (and of the CE: they differ by a constant) = T (q_T - p_T)."""
        teacher = t[rows[sl]].to(s.dtype)
        value = soft_kd_per_position(s, teacher, tau, form).sum()
        grad = torch.softmax(s / tau if tau != 1.0 else s, dim=-1)
        grad.sub_(torch.softmax(teacher / tau if tau != 1.0 else teacher, dim=-1))
        return value, grad.mul_(tau)

    return ChunkTerm(rows, chunk_loss, rows.numel(), value_and_grad)


@register_chunked("kd_kl")
def kd_kl_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                  temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _soft_term(student_logits, teacher_logits, mask, temperature, "kl")


@register_chunked("kd_ce")
def kd_ce_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                  temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _soft_term(student_logits, teacher_logits, mask, temperature, "ce")


def _divergence_term(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], temperature,
                     per_position: Callable[[Tensor, Tensor, float], Tensor]) -> Optional[ChunkTerm]:
    """A teacher-vs-student divergence of kdlib/losses/divergences.py as a ChunkTerm: ``per_position(s, t, T)``
    summed over the chunk's rows; the gradient w.r.t. the chunk's logits comes from autograd through it."""
    tau = float_temperature(temperature)
    if tau is None:
        return None
    rows, t = _teacher_rows(student_logits, teacher_logits, mask)

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return per_position(s, t[rows[sl]].to(s.dtype), tau).sum()

    return ChunkTerm(rows, chunk_loss, rows.numel())


@register_chunked("reverse_kl")
def reverse_kl_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                       temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _divergence_term(student_logits, teacher_logits, mask, temperature, reverse_kl_per_position)


@register_chunked("jsd")
def jsd_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                temperature: float = 1.0, beta: float = 0.5) -> Optional[ChunkTerm]:
    b = check_beta(beta)
    return _divergence_term(student_logits, teacher_logits, mask, temperature,
                            lambda s, t, tau: jsd_per_position(s, t, tau, b))


@register_chunked("tvd")
def tvd_chunked(student_logits: FactoredLogits, teacher_logits: Tensor, mask: Optional[Tensor], *,
                temperature: float = 1.0) -> Optional[ChunkTerm]:
    return _divergence_term(student_logits, teacher_logits, mask, temperature, tvd_per_position)


def _label_term(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], ignore_index: int) -> ChunkTerm:
    """Only the labelled rows are read (a masked-LM step labels ~15% of positions)."""
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    rows = _real_rows(student_logits, mask, labels != ignore_index)
    y = labels.reshape(-1)[rows].long()

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return -F.log_softmax(s, dim=-1).gather(-1, y[sl].unsqueeze(-1)).sum()

    @torch.no_grad()
    def value_and_grad(s: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """d/ds of -log softmax(s)_y = softmax(s) - onehot(y)."""
        log_q = F.log_softmax(s, dim=-1)
        target = y[sl].unsqueeze(-1)
        value = -log_q.gather(-1, target).sum()
        grad = log_q.exp_()
        grad.scatter_add_(-1, target, torch.full_like(target, -1.0, dtype=grad.dtype))
        return value, grad

    return ChunkTerm(rows, chunk_loss, rows.numel(), value_and_grad)


@register_chunked("mlm_ce")
def mlm_ce_chunked(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], *,
                   ignore_index: int = -100) -> ChunkTerm:
    return _label_term(student_logits, labels, mask, ignore_index)


@register_chunked("hard_ce")
def hard_ce_chunked(student_logits: FactoredLogits, labels: Tensor, mask: Optional[Tensor], *,
                    ignore_index: int = -100) -> ChunkTerm:
    return _label_term(student_logits, labels, mask, ignore_index)


@register_chunked("next_token_ce")
def next_token_ce_chunked(student_logits: FactoredLogits, next_token_labels: Tensor, mask: Optional[Tensor], *,
                          ignore_index: int = -100) -> ChunkTerm:
    return _label_term(student_logits, next_token_labels, mask, ignore_index)


# The same losses on plain (N, H) rows: every row real, no mask.

def _strict_temperature(temperature) -> float:
    tau = float_temperature(temperature)
    if tau is None:
        raise ValueError(f"temperature: expected a float, got a tensor of shape {tuple(temperature.shape)}")
    return tau


def _single(logits: FactoredLogits, term: ChunkTerm) -> Tensor:
    return fused_loss(logits, [term], [1.0])[0]


def _check_projection(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int) -> tuple[int, int]:
    """(N, V) after checking hidden (N, H), weight (V, H), bias (V,) or None and chunk_size >= 1."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected (N, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected dtype {hidden.dtype} (as hidden), got {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected ({weight.shape[0]},) or None, got {tuple(bias.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    return hidden.shape[0], weight.shape[0]


def chunked_kd_topk(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], topk_ids: Tensor, topk_logits: Tensor,
                    teacher_lse: Tensor, *, temperature: float = 1.0,
                    missing_mass: Literal["renormalize", "rest_bucket"] = "renormalize",
                    chunk_size: int = 1024) -> Tensor:
    """``kd_topk`` on logits = hidden @ weight.T + bias without materialising (N, V) for all rows.

    Shapes: hidden (N, H), weight (V, H), bias (V,) or None, topk_ids/topk_logits (N, k), teacher_lse (N,).
    """
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    tau = _strict_temperature(temperature)
    if missing_mass not in MISSING_MASS_MODES:
        raise ValueError(f"missing_mass: expected one of {list(MISSING_MASS_MODES)}, got {missing_mass!r}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids: expected ({n}, k), got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if topk_logits.shape != topk_ids.shape:
        raise ValueError(f"topk_logits: expected {tuple(topk_ids.shape)}, got {tuple(topk_logits.shape)}")
    if tuple(teacher_lse.shape) != (n,):
        raise ValueError(f"teacher_lse: expected ({n},), got {tuple(teacher_lse.shape)}")
    if k > v:
        raise ValueError(f"topk_ids: expected k <= V={v}, got k={k}")
    ids = topk_ids.long()
    if n and bool(((ids < 0) | (ids >= v)).any()):
        raise ValueError(f"topk_ids: expected ids in [0, {v})")
    logits = FactoredLogits(hidden, weight, bias, chunk_size)
    return _single(logits, kd_topk_chunked(logits, ids, topk_logits, teacher_lse, None, temperature=tau,
                                           missing_mass=missing_mass))


def _chunked_soft(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Tensor,
                  temperature: float, chunk_size: int, form: str) -> Tensor:
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    tau = _strict_temperature(temperature)
    if tuple(teacher_logits.shape) != (n, v):
        raise ValueError(f"teacher_logits: expected ({n}, {v}), got {tuple(teacher_logits.shape)}")
    logits = FactoredLogits(hidden, weight, bias, chunk_size)
    return _single(logits, _soft_term(logits, teacher_logits, None, tau, form))


def chunked_kd_kl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Tensor, *,
                  temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """``kd_kl`` (T^2 * mean KL(teacher || student)) on hidden @ weight.T + bias, chunk by chunk.

    teacher_logits (N, V): only ``chunk_size`` rows of it are converted / softmaxed at a time.
    """
    return _chunked_soft(hidden, weight, bias, teacher_logits, temperature, chunk_size, "kl")


def chunked_kd_ce(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Tensor, *,
                  temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """``kd_ce`` (T^2 * mean soft cross-entropy) on hidden @ weight.T + bias, chunk by chunk."""
    return _chunked_soft(hidden, weight, bias, teacher_logits, temperature, chunk_size, "ce")


def chunked_label_ce(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                     ignore_index: int = -100, chunk_size: int = 1024) -> Tensor:
    """``mlm_ce``/``hard_ce``: mean over rows with label != ignore_index of -log softmax(logits)[y].

    The labelled rows are selected first (a masked-LM step labels ~15% of positions), so ignored rows
    cost nothing, not even their logits; all rows ignored gives 0.
    """
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels: expected ({n},), got {tuple(labels.shape)}")
    y = labels.long()
    if bool(((y != ignore_index) & ((y < 0) | (y >= v))).any()):
        raise ValueError(f"labels: expected ids in [0, {v}) or ignore_index={ignore_index}")
    logits = FactoredLogits(hidden, weight, bias, chunk_size)
    return _single(logits, _label_term(logits, labels, None, ignore_index))


@register_chunked("kd_sparse")
def kd_sparse_chunked(student_logits: FactoredLogits, sparse_ids: Tensor, sparse_weights: Tensor,
                      mask: Optional[Tensor]) -> ChunkTerm:
    V, lead = student_logits.shape[-1], student_logits.shape[:-1]
    if tuple(sparse_ids.shape[:-1]) != tuple(lead) or sparse_weights.shape != sparse_ids.shape:
        raise ValueError(f"sparse_ids/sparse_weights: expected {tuple(lead)} + (m,), got {tuple(sparse_ids.shape)}, "
                         f"{tuple(sparse_weights.shape)}")
    rows = _real_rows(student_logits, mask)
    m = sparse_ids.shape[-1]
    ids = sparse_ids.reshape(-1, m)[rows].long()
    if bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"sparse_ids: expected ids in [0, {V}) at real positions")
    w = sparse_weights.detach().reshape(-1, m)[rows]

    def chunk_loss(s: Tensor, sl: slice) -> Tensor:
        return sparse_kd_per_position(s, ids[sl], w[sl]).sum()

    @torch.no_grad()
    def value_and_grad(s: Tensor, sl: slice) -> tuple[Tensor, Tensor]:
        """d/ds of sum_j w_j (logsumexp(s) - s_j) = softmax(s) * sum_j w_j - w (scattered)."""
        weights = w[sl].to(s.dtype)
        value = sparse_kd_per_position(s, ids[sl], weights).sum()
        grad = torch.softmax(s, dim=-1).mul_(weights.sum(-1, keepdim=True))
        grad.scatter_add_(-1, ids[sl], -weights)
        return value, grad

    return ChunkTerm(rows, chunk_loss, rows.numel(), value_and_grad)
