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
`chunked_kd_topk` & co. there are the same on plain (N, H) rows. Each gives exactly the mean the
unchunked loss gives on ``hidden @ weight.T + bias``, up to summation order. Teacher tensors are
detached. Double backward is not supported: create_graph=True raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import check_temperature

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
    # optional closed form: (logits, slice) -> (SUM of the loss, its gradient w.r.t. those logits); saves the
    # autograd graph's passes over (c, V). Must equal autograd through chunk_loss (tested in float64).
    value_and_grad: Optional[Callable[[Tensor, slice], tuple[Tensor, Tensor]]] = None


def _union(terms: Sequence[ChunkTerm]) -> tuple[Tensor, list[Tensor]]:
    """The rows any term reads (ascending) and, per term, where its rows sit in that union."""
    rows = [t.rows.long() for t in terms]
    if len(rows) == 1:
        return rows[0], [torch.arange(rows[0].numel(), device=rows[0].device)]
    union = torch.unique(torch.cat(rows))  # sorted
    return union, [torch.searchsorted(union, r) for r in rows]


def _rows(logits: Tensor, local: Optional[Tensor]) -> Tensor:
    """The chunk's logits at a term's rows (all of them without a copy when ``local`` is None)."""
    return logits if local is None else logits[local]


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
                local = pos[lo:hi] - start
                parts.append((i, slice(lo, hi), None if hi - lo == stop - start else local))  # None: every row
        if not any(need):
            with torch.no_grad():
                for i, sl, local in parts:
                    sums[i] += terms[i].chunk_loss(_rows(logits, local), sl).double()
            continue
        g = None
        closed = [p for p in parts if terms[p[0]].value_and_grad is not None]
        for i, sl, local in closed:
            value, grad = terms[i].value_and_grad(_rows(logits, local), sl)
            sums[i] += value.double()
            if g is None and local is None:  # the term reads every row of the chunk
                g = grad.mul_(factors[i])
            else:
                g = torch.zeros_like(logits) if g is None else g
                if local is None:
                    g.add_(grad, alpha=factors[i])
                else:
                    g.index_add_(0, local, grad, alpha=factors[i])
            del grad
        traced = [p for p in parts if terms[p[0]].value_and_grad is None]
        if traced:
            logits.requires_grad_(True)
            with torch.enable_grad():
                losses = [terms[i].chunk_loss(_rows(logits, local), sl) for i, sl, local in traced]
                weighted = sum(factors[i] * loss for (i, _, _), loss in zip(traced, losses))
                (g_traced,) = torch.autograd.grad(weighted, logits)
            for (i, _, _), loss in zip(traced, losses):
                sums[i] += loss.detach().double()
            g = g_traced if g is None else g.add_(g_traced)
            del losses, weighted, g_traced  # free the chunk's graph (log-softmax etc.) before the next chunk
        del logits  # g is set: every chunk is a slice of the union, so some term reads its rows
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
