"""Output-layer losses computed from the head's input chunk by chunk over positions, never holding (N, V).

At a 30k-128k vocabulary the student's (N, V) logits, their log-softmax and the logit gradient are the
largest tensors of a KD step. Here the logits stay *factored*: `FactoredLogits` holds the head's input
``hidden`` (..., H), its ``weight`` (V, H) and ``bias`` (V,) or None. A loss becomes a `ChunkTerm`: the
rows it reads, a function giving the SUM of its per-position loss over some of those rows from their
logits, and its denominator. `fused_loss` runs any number of terms in ONE pass over chunks of their
rows: each chunk's logits are computed once (in float32, whatever the model's precision), every term
adds its part, and the gradient with respect to the chunk's logits -- by local autograd through the
*existing* per-position losses, so the math lives in one place -- is folded straight into
grad_hidden (the chunk's rows), grad_weight (+= g^T h) and grad_bias (+= sum_rows g), accumulated in
float32. Backward only scales the stored gradients by grad_output (the technique of Liger-Kernel's
fused linear cross-entropy). A masked-LM step's `kd_topk` and `mlm_ce` thus share one projection.

The registered losses' chunked twins (kdlib/losses/chunked_twins.py) build the terms;
`chunked_kd_topk` & co. below are the same on plain (N, H) rows. Each gives exactly the mean the
unchunked loss gives on ``hidden @ weight.T + bias``, up to summation order. Teacher tensors are
detached. Double backward is not supported: create_graph=True raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature
from kdlib.losses.output import soft_kd_per_position
from kdlib.losses.topk import MISSING_MASS_MODES, topk_kd_per_position

# (float32 logits of some of a term's rows (c, V), their slice in the term's 0..n) -> SUM of the loss there
ChunkLoss = Callable[[Tensor, slice], Tensor]


def at_least_fp32(x: Tensor) -> Tensor:
    """fp16 / bf16 logits in float32 (losses are computed in fp32); float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class FactoredLogits:
    """logits = hidden @ weight.T + bias for a linear output head, not computed until someone needs them.

    ``hidden`` (..., H) is the head's input at every position; `dense()` materialises the float32 logits
    (..., V) once, for losses that have no chunked twin."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int):
        if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"weight: expected (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected ({weight.shape[0]},) or None, got {tuple(bias.shape)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
        self.hidden, self.weight, self.bias, self.chunk_size = hidden, weight, bias, chunk_size
        self._dense: Optional[Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size(tuple(self.hidden.shape[:-1]) + (self.weight.shape[0],))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def dim(self) -> int:
        return self.hidden.dim()

    def rows(self) -> Tensor:
        """(N, H): the head's input with the leading dimensions flattened."""
        return self.hidden.reshape(-1, self.hidden.shape[-1])

    def dense(self) -> Tensor:
        if self._dense is None:
            self._dense = at_least_fp32(F.linear(self.hidden, self.weight, self.bias))
        return self._dense


@dataclass
class ChunkTerm:
    """One loss over some rows of a FactoredLogits: sum over its rows of chunk_loss, divided by denom."""

    rows: Tensor  # (n,) int64 indices into FactoredLogits.rows(), ascending, no repeats
    chunk_loss: ChunkLoss
    denom: int  # the mean's denominator (0: the term is 0)


def _union(terms: Sequence[ChunkTerm]) -> tuple[Tensor, list[Tensor]]:
    """The rows any term reads (ascending) and, per term, where its rows sit in that union."""
    rows = [t.rows.long() for t in terms]
    if len(rows) == 1:
        return rows[0], [torch.arange(rows[0].numel(), device=rows[0].device)]
    union = torch.unique(torch.cat(rows))  # sorted
    return union, [torch.searchsorted(union, r) for r in rows]


def _chunk_loop(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], terms: Sequence[ChunkTerm],
                scales: Sequence[float], chunk_size: int, need: tuple[bool, bool, bool]):
    """(values (len(terms),) float64 of sum/denom per term, grads of sum_t scale_t * value_t where ``need``)."""
    union, where = _union(terms)
    factors = [s / t.denom if t.denom else 0.0 for s, t in zip(scales, terms)]
    sums = torch.zeros(len(terms), dtype=torch.float64, device=hidden.device)
    gh = torch.zeros_like(hidden) if need[0] else None
    gw = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float64 else weight.dtype,
                     device=weight.device) if need[1] else None
    gb = torch.zeros(bias.shape, dtype=gw.dtype if gw is not None else torch.float32, device=bias.device) \
        if need[2] else None
    w, b = weight.detach(), None if bias is None else bias.detach()
    for start in range(0, union.numel(), chunk_size):
        stop = min(start + chunk_size, union.numel())
        chunk_rows = union[start:stop]
        h = hidden.detach()[chunk_rows]
        with torch.no_grad():
            logits = at_least_fp32(F.linear(h, w, b))
        parts = []  # (term index, its slice, the chunk-local rows)
        for i, pos in enumerate(where):
            lo, hi = (int(x) for x in torch.searchsorted(pos, torch.tensor([start, stop], device=pos.device)))
            if hi > lo:
                parts.append((i, slice(lo, hi), pos[lo:hi] - start))
        if not any(need):
            with torch.no_grad():
                for i, sl, local in parts:
                    sums[i] += terms[i].chunk_loss(logits[local], sl).double()
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            losses = [terms[i].chunk_loss(logits[local], sl) for i, sl, local in parts]
            weighted = sum(factors[i] * loss for (i, _, _), loss in zip(parts, losses))
            (g,) = torch.autograd.grad(weighted, logits) if parts else (torch.zeros_like(logits),)
        for (i, _, _), loss in zip(parts, losses):
            sums[i] += loss.detach().double()
        del logits, losses, weighted  # free the chunk's graph (log-softmax etc.) before the next chunk
        if gh is not None:
            gh[chunk_rows] = (g.to(w.dtype) @ w).to(gh.dtype)
        if gw is not None:
            gw.addmm_(g.t().to(gw.dtype), h.to(gw.dtype))
        if gb is not None:
            gb.add_(g.sum(0).to(gb.dtype))
    values = torch.stack([sums[i] / t.denom if t.denom else sums[i] * 0 for i, t in enumerate(terms)])
    grads = (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype))
    return values, grads


class _FusedLinearLoss(torch.autograd.Function):
    """Gradients are produced in forward (chunk by chunk); backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, scales, chunk_size):
        need = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        values, grads = _chunk_loop(hidden, weight, bias, terms, scales, chunk_size, need)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.present = tuple(g is not None for g in grads)
        total = (values * torch.tensor(scales, dtype=values.dtype, device=values.device)).sum()
        return total.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32), values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):
        if torch.is_grad_enabled():  # create_graph=True: the second-order terms would silently be missing
            raise RuntimeError("chunked KD losses: double backward (create_graph=True) is not supported")
        grads = tuple(g * grad_total.to(g.dtype) if present else None
                      for g, present in zip(ctx.saved_tensors, ctx.present))
        return grads + (None, None, None)


def fused_loss(logits: FactoredLogits, terms: Sequence[ChunkTerm], scales: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(sum_t scales[t] * term_t with its gradient, the detached term values (len(terms),) float64)."""
    hidden, weight, bias = logits.rows(), logits.weight, logits.bias
    if not terms:
        return hidden.new_zeros((), dtype=torch.float32), torch.zeros(0, dtype=torch.float64)
    scales = [float(s) for s in scales]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        total, values = _FusedLinearLoss.apply(hidden, weight, bias, list(terms), scales, logits.chunk_size)
        return total, values.detach()
    values, _ = _chunk_loop(hidden, weight, bias, terms, scales, logits.chunk_size, (False, False, False))
    total = (values * torch.tensor(scales, dtype=values.dtype, device=values.device)).sum()
    return total.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32), values


def float_temperature(temperature) -> Optional[float]:
    """The temperature as a float, or None when it is per position (a tensor of several values)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            return None
        temperature = float(temperature)
    check_temperature(temperature)
    return float(temperature)


def _strict_temperature(temperature) -> float:
    tau = float_temperature(temperature)
    if tau is None:
        raise ValueError(f"temperature: expected a float, got a tensor of shape {tuple(temperature.shape)}")
    return tau


def _single(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_loss: ChunkLoss, chunk_size: int,
            n: int) -> Tensor:
    """One term over all N rows of plain (N, H) ``hidden``: the mean of chunk_loss."""
    rows = torch.arange(n, device=hidden.device)
    return fused_loss(FactoredLogits(hidden, weight, bias, chunk_size), [ChunkTerm(rows, chunk_loss, n)], [1.0])[0]


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
    z, lse = topk_logits.detach().to(hidden.dtype), teacher_lse.detach().to(hidden.dtype)

    def chunk_loss(s: Tensor, rows: slice) -> Tensor:
        return topk_kd_per_position(s, ids[rows], z[rows], lse[rows], v - k, tau, missing_mass).sum()

    return _single(hidden, weight, bias, chunk_loss, chunk_size, n)


def _chunked_soft(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Tensor,
                  temperature: float, chunk_size: int, form: str) -> Tensor:
    n, v = _check_projection(hidden, weight, bias, chunk_size)
    tau = _strict_temperature(temperature)
    if tuple(teacher_logits.shape) != (n, v):
        raise ValueError(f"teacher_logits: expected ({n}, {v}), got {tuple(teacher_logits.shape)}")
    t = teacher_logits.detach()

    def chunk_loss(s: Tensor, rows: slice) -> Tensor:
        return soft_kd_per_position(s, t[rows].to(s.dtype), tau, form).sum()

    return _single(hidden, weight, bias, chunk_loss, chunk_size, n)


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

    return _single(h, weight, bias, chunk_loss, chunk_size, h.shape[0])
