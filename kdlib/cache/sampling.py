"""Sampled sparse teacher targets (Sparse Logit Sampling, Anshumann et al., ACL 2025): draw, store, weigh.

Per position the pipeline draws N ids from the teacher p = softmax(z) at T = 1, with replacement; when
the top-k is cached too, from the teacher restricted to the ids outside its top-k K (a sampled tail).
A position stores its unique drawn ids and their counts c. The reader turns them into weights w with
E[w] = p for every id:
  pure sampling:  w_i = c_i / N                                     (E[c_i] = N p_i)
  top-k + tail:   w_i = p_i = e^{z_i - lse} on K (exact), w_j = r c_j / N outside K,
                  r = 1 - sum_K p_i the teacher's missing mass      (E[c_j] = N p_j / r)
Both sum to 1, so softmax(s) - w (the gradient of -sum_i w_i log softmax(s)_i) is an unbiased estimate
of the dense KD gradient softmax(s) - p at every student s; top-k alone (renormalised over K) is not:
it drops the tail's share of the gradient at every step.

Draws are by inverse CDF in float64, with uniforms from numpy's PCG64 seeded per row (the pipeline
seeds from its seed and the row id), so a row's draws depend on its logits and its id only: a rebuilt
shard is byte-identical whatever the worker count or order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from kdlib.cache.codec import stored_topk_logits
from kdlib.text.padding import length_mask


def draw(logits_tv: torch.Tensor, n: int, rng: np.random.Generator,
         exclude: Optional[torch.Tensor] = None) -> np.ndarray:
    """(T, n) int64 ids drawn from softmax(logits) over each row, with replacement, ids in `exclude` (T, k)
    never drawn. A row whose remaining mass is 0 (exclusion of everything it holds) gets id -1."""
    p = torch.softmax(logits_tv.double(), dim=-1)
    if exclude is not None:
        p = p.scatter(-1, exclude.long(), 0.0)
    cdf = torch.cumsum(p, dim=-1)
    total = cdf[:, -1:]
    # u in (0, total]: the first id whose cdf reaches u has cdf[j] >= u > cdf[j-1], so p_j > 0
    u = (1.0 - torch.from_numpy(rng.random((logits_tv.shape[0], n)))) * total
    ids = torch.searchsorted(cdf, u).clamp_(max=p.shape[-1] - 1)
    ids[(total <= 0).expand_as(ids)] = -1
    return ids.numpy()


def compact(draws_tn: np.ndarray, id_dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws (T, n) -> the stored columns: unique ids per position ascending (flat), their counts (uint8,
    flat) and how many unique ids each position has (uint8, (T,)). Ids -1 (nothing drawn) are dropped."""
    T, n = draws_tn.shape
    ordered = np.sort(draws_tn, axis=1)
    first = np.ones((T, n), dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = np.flatnonzero(first.reshape(-1))  # runs never cross positions: each position starts one
    counts = np.diff(np.append(starts, T * n))
    ids = ordered.reshape(-1)[starts]
    keep = ids >= 0
    sizes = (first & (ordered >= 0)).sum(1)
    return ids[keep].astype(id_dtype), counts[keep].astype(np.uint8), sizes.astype(np.uint8)


def sparse_targets(sample_ids: Sequence, sample_counts: Sequence, sample_sizes: Sequence, lengths: np.ndarray,
                   T: int, n: int, topk: Optional[tuple] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row stored columns -> (B, T, m) int64 ids and float32 weights (module docstring), m = the batch's
    most unique ids at a position (+ k with the top-k first); padding has id 0 and weight 0.

    topk: (ids (B, T, k), logits (B, T, k), lse (B, T)) of the batch, for a top-k + tail cache."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = [np.asarray(s, dtype=np.int64) for s in sample_sizes]
    for i, (s, length) in enumerate(zip(sizes, lengths)):
        if len(s) != length or len(sample_ids[i]) != s.sum() or len(sample_counts[i]) != s.sum():
            raise ValueError(f"sample_sizes: row {i} has {len(s)} sizes for {length} positions, summing to "
                             f"{s.sum()}, with {len(sample_ids[i])} sample_ids and {len(sample_counts[i])} counts")
    flat_sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    width = int(flat_sizes.max()) if flat_sizes.size else 0
    ids = np.zeros((flat_sizes.size, width), dtype=np.int64)
    weights = np.zeros((flat_sizes.size, width), dtype=np.float64)
    if flat_sizes.sum():
        position = np.repeat(np.arange(flat_sizes.size), flat_sizes)
        column = np.arange(position.size) - np.repeat(np.cumsum(flat_sizes) - flat_sizes, flat_sizes)
        ids[position, column] = np.concatenate([np.asarray(v).reshape(-1) for v in sample_ids], dtype=np.int64,
                                               casting="unsafe")
        weights[position, column] = np.concatenate([np.asarray(v).reshape(-1) for v in sample_counts],
                                                   dtype=np.float64, casting="unsafe") / n
    real = length_mask(lengths, T)
    out_ids = np.zeros((len(lengths), T, width), dtype=np.int64)
    out_w = np.zeros((len(lengths), T, width), dtype=np.float64)
    out_ids[real], out_w[real] = ids, weights
    if topk is not None:
        top_ids, top_logits, lse = (np.asarray(x) for x in topk)
        p = np.exp(top_logits.astype(np.float64) - lse.astype(np.float64)[..., None]) * real[..., None]
        rest = np.clip(1.0 - p.sum(-1), 0.0, None)
        out_ids = np.concatenate([np.where(real[..., None], top_ids, 0).astype(np.int64), out_ids], axis=-1)
        out_w = np.concatenate([p, out_w * rest[..., None]], axis=-1)
    return out_ids, out_w.astype(np.float32)


def sample_columns(logits_tv: torch.Tensor, n: int, seed: int, exclude: Optional[torch.Tensor], id_dtype) -> dict:
    """One row's stored sample columns: n draws per position from its (T, V) teacher logits, never the ids
    in `exclude` (T, k: the cached top-k, or None), from a generator seeded with `seed` alone."""
    ids, counts, sizes = compact(draw(logits_tv, n, np.random.default_rng(seed), exclude), id_dtype)
    return {"sample_ids": ids, "sample_counts": counts, "sample_sizes": sizes}


# ---------------------------------------------------------------- fidelity: what an estimate loses

REFERENCE_STUDENT_SCALE = 0.5  # the reference student s = 0.5 * teacher logits: a fixed, softer proxy for a student


def dense_weights(ids_nm: torch.Tensor, weights_nm: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) float64 estimate from sparse ids and weights (repeated ids add up; padding has weight 0)."""
    out = torch.zeros((ids_nm.shape[0], vocab_size), dtype=torch.float64)
    return out.scatter_add_(-1, ids_nm.long(), weights_nm.double())


def expected_weights(logits_nv: torch.Tensor, ids_nm: torch.Tensor, weights_nm: torch.Tensor, top_k: int) -> torch.Tensor:
    """(N, V) float64 E[w] over the draws, given the stored top-k (the first top_k columns): p itself for pure
    sampling; for top-k + tail the stored p_i on the top-k and r_stored * p_j / r on the tail (r_stored from
    the fp16 top-k logits, r exact), so the only bias left is that of the top-k's storage."""
    p = torch.softmax(logits_nv.double(), dim=-1)
    if not top_k:
        return p
    top_ids, top_w = ids_nm[:, :top_k].long(), weights_nm[:, :top_k].double()
    r_stored = (1.0 - top_w.sum(-1)).clamp(min=0.0)
    r_exact = (1.0 - p.gather(-1, top_ids).sum(-1)).clamp(min=1e-300)
    return (p * (r_stored / r_exact).unsqueeze(-1)).scatter(-1, top_ids, top_w)


def estimate_fidelity(logits_nv: torch.Tensor, reconstruction_nv: torch.Tensor, estimate_nv: torch.Tensor,
                      expected_nv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position (float64): total variation and KL(p || reconstruction) of the teacher p = softmax(z); and, at
    the reference student s = REFERENCE_STUDENT_SCALE * z, the cosine between the gradient of CE(estimate,
    softmax(s)), softmax(s) * sum(estimate) - estimate, and the dense KD gradient softmax(s) - p, the norm of
    their difference (error of this draw) and the norm of E[estimated gradient] - dense gradient (bias).
    KL is +inf where p has mass the reconstruction gives none (a sampled estimate: see the pipeline)."""
    z = logits_nv.double()
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    tv = 0.5 * (p - reconstruction_nv).abs().sum(-1)
    held = reconstruction_nv > 0
    terms = torch.where(held, p * (log_p - torch.log(reconstruction_nv.clamp(min=1e-300))), torch.zeros_like(p))
    kl = torch.where(((p > 0) & ~held).any(-1), torch.full_like(tv, torch.inf), terms.sum(-1))
    q = torch.softmax(REFERENCE_STUDENT_SCALE * z, dim=-1)
    dense = q - p
    grad = q * estimate_nv.sum(-1, keepdim=True) - estimate_nv
    mean_grad = q * expected_nv.sum(-1, keepdim=True) - expected_nv
    cosine = (grad * dense).sum(-1) / (grad.norm(dim=-1) * dense.norm(dim=-1)).clamp(min=1e-300)
    return {"tv": tv, "kl": kl, "grad_cosine": cosine, "grad_error_norm": (grad - dense).norm(dim=-1),
            "grad_bias_norm": (mean_grad - dense).norm(dim=-1)}


def position_samples(row: dict, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored (unique ids, counts) of position t of one row's sample columns."""
    sizes = np.asarray(row["sample_sizes"], dtype=np.int64)
    start = int(sizes[:t].sum())
    return row["sample_ids"][start:start + sizes[t]], row["sample_counts"][start:start + sizes[t]]


def sampled_fidelity_sums(logits_pv: torch.Tensor, samples: list[tuple[np.ndarray, np.ndarray]], top_k: int,
                          n: int, topk_encoding: str = "fp16") -> dict:
    """Sums over P positions of `estimate_fidelity`'s figures for the weights the reader makes from these
    positions' stored (ids, counts) and, with top_k, their top-k as cached (logits as `topk_encoding` stores
    them, fp32 lse)."""
    P, V = logits_pv.shape
    topk = None
    if top_k:
        top = torch.topk(logits_pv, top_k, dim=-1, sorted=True)
        lse = torch.logsumexp(logits_pv, dim=-1)
        stored = stored_topk_logits(top.values.float().numpy(), topk_encoding)
        topk = (top.indices.numpy()[:, None], stored[:, None], lse.numpy()[:, None])
    ids, w = sparse_targets([s[0] for s in samples], [s[1] for s in samples], [[len(s[0])] for s in samples],
                            np.ones(P, dtype=np.int64), 1, n, topk)
    ids, w = torch.from_numpy(ids[:, 0]), torch.from_numpy(w[:, 0])
    estimate = dense_weights(ids, w, V)
    figures = estimate_fidelity(logits_pv, estimate, estimate, expected_weights(logits_pv, ids, w, top_k))
    return {"positions": P, "kl_infinite": int(torch.isinf(figures.pop("kl")).sum()),
            **{name: float(value.sum()) for name, value in figures.items()}}
