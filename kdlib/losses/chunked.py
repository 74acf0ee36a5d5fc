"""Output-layer KD losses computed from the student's hidden states chunk by chunk over positions.

At a 30k-word vocabulary the student's (N, V) logits, their log-softmax and the logit gradient are the
largest tensors of a KD step. These functions take the final hidden states ``hidden`` (N, H) at the real
positions, the output projection ``weight`` (V, H) and ``bias`` (V,) or None, and never hold more than
``chunk_size`` rows of (·, V) at once: a custom autograd Function computes, in its forward pass, each
chunk's logits, the chunk's loss and its gradient with respect to those logits (by local autograd through
the *existing* per-position loss, so the math lives in one place), and folds that gradient straight into
grad_hidden (the chunk's rows), grad_weight (+= g^T h) and grad_bias (+= sum_rows g). Backward only scales
the stored gradients by grad_output (the technique of Liger-Kernel's fused linear cross-entropy).

Each function returns exactly the mean the unchunked loss gives on ``hidden @ weight.T + bias``
(``kd_topk``, ``kd_kl``, ``kd_ce``, ``mlm_ce``/``hard_ce`` with mask None), up to summation order.
Teacher tensors are detached. Double backward is not supported: create_graph=True raises.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.topk import MISSING_MASS_MODES, topk_kd_per_position

# (logits of one chunk (c, V), the chunk's rows in 0..N) -> SUM of the per-position loss over the chunk
ChunkLoss = Callable[[Tensor, slice], Tensor]


def _chunk_loop(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_loss: ChunkLoss, chunk_size: int,
                denom: int, need: tuple[bool, bool, bool]):
    """(loss, grad_hidden, grad_weight, grad_bias) of sum(chunk losses) / denom; grads only where ``need``."""
    n = hidden.shape[0]
    total = hidden.new_zeros(())
    gh = torch.zeros_like(hidden) if need[0] else None
    gw = torch.zeros_like(weight) if need[1] else None
    gb = torch.zeros_like(bias) if need[2] else None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        h = hidden[rows]
        with torch.no_grad():
            logits = F.linear(h.detach(), weight.detach(), None if bias is None else bias.detach())
        if not any(need):
            with torch.no_grad():
                total = total + chunk_loss(logits, rows)
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            loss = chunk_loss(logits, rows)
            (g,) = torch.autograd.grad(loss, logits)
        total = total + loss.detach()
        del logits, loss  # free the chunk's graph (log-softmax etc.) before the next chunk
        if gh is not None:
            gh[rows] = g @ weight.detach()
        if gw is not None:
            gw.addmm_(g.t(), h.detach())
        if gb is not None:
            gb.add_(g.sum(0))
    scale = 1.0 / max(denom, 1)
    grads = tuple(None if x is None else x.mul_(scale) for x in (gh, gw, gb))
    return (total * scale,) + grads


class _ChunkedLinearLoss(torch.autograd.Function):
    """Gradients are produced in forward (chunk by chunk); backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_loss, chunk_size, denom):
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        loss, gh, gw, gb = _chunk_loop(hidden, weight, bias, chunk_loss, chunk_size, denom, need)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the second-order terms would silently be missing
            raise RuntimeError("chunked KD losses: double backward (create_graph=True) is not supported")
        grads = tuple(None if g is None else g * grad_output for g in ctx.saved_tensors)
        return grads + (None, None, None)


def _chunked(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_loss: ChunkLoss, chunk_size: int,
             denom: int) -> Tensor:
    """Run the chunk loop through the autograd Function when a gradient is wanted, else plainly (eval)."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        return _ChunkedLinearLoss.apply(hidden, weight, bias, chunk_loss, chunk_size, denom)
    return _chunk_loop(hidden, weight, bias, chunk_loss, chunk_size, denom, (False, False, False))[0]


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


def _float_temperature(temperature: float) -> float:
    if isinstance(temperature, Tensor) and temperature.numel() != 1:
        raise ValueError(f"temperature: expected a float, got a tensor of shape {tuple(temperature.shape)}")
    check_temperature(temperature)
    return float(temperature)


def chunked_kd_topk(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], topk_ids: Tensor, topk_logits: Tensor,
                    teacher_lse: Tensor, *, temperature: float = 1.0,
                    missing_mass: Literal["renormalize", "rest_bucket"] = "renormalize",
                    chunk_size: int = 1024) -> Tensor:
    """``kd_topk`` on logits = hidden @ weight.T + bias without materialising (N, V) for all rows.

    Shapes: hidden (N, H), weight (V, H), bias (V,) or None, topk_ids/topk_logits (N, k), teacher_lse (N,).
    """
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    tau = _float_temperature(temperature)
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
    z, lse = topk_logits.detach().to(hidden.dtype), teacher_lse.detach().to(hidden.dtype)

    def chunk_loss(s: Tensor, rows: slice) -> Tensor:
        return topk_kd_per_position(s, ids[rows], z[rows], lse[rows], v - k, tau, missing_mass).sum()

    return _chunked(hidden, weight, bias, chunk_loss, chunk_size, n)


def _chunked_soft(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Tensor,
                  temperature: float, chunk_size: int, form: str) -> Tensor:
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    tau = _float_temperature(temperature)
    if tuple(teacher_logits.shape) != (n, v):
        raise ValueError(f"teacher_logits: expected ({n}, {v}), got {tuple(teacher_logits.shape)}")
    t = teacher_logits.detach()

    def chunk_loss(s: Tensor, rows: slice) -> Tensor:
        return soft_kd_per_position(s, t[rows].to(s.dtype), tau, form).sum()

    return _chunked(hidden, weight, bias, chunk_loss, chunk_size, n)


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
    keep = labels != ignore_index
    y = labels[keep].long()
    if y.numel() and bool(((y < 0) | (y >= v)).any()):
        raise ValueError(f"labels: expected ids in [0, {v}) or ignore_index={ignore_index}")
    h = hidden[keep]

    def chunk_loss(s: Tensor, rows: slice) -> Tensor:
        return -F.log_softmax(s, dim=-1).gather(-1, y[rows].unsqueeze(-1)).sum()

    return _chunked(h, weight, bias, chunk_loss, chunk_size, h.shape[0])
