"""KD from a sampled sparse teacher cache (Sparse Logit Sampling, Anshumann et al., ACL 2025).

Per position the transfer set holds ids and weights w whose expectation is the teacher p at T = 1
(kdlib/cache/sampling.py): draws from the teacher (w = count / N), or its exact top-k plus a sampled
tail (w = p_i on the top-k, r * count / N on the tail, r the teacher's missing mass). The loss is the
soft cross-entropy against that estimate,
    L = -sum_j w_j log softmax(s)_j = sum_j w_j (logsumexp(s) - s_j),
an unbiased estimate of -sum_v p_v log q_v = KL(p || q) + H(p) (H(p), the teacher entropy, is a
constant), whose gradient softmax(s) * sum_j w_j - w (= softmax(s) - w, as sum_j w_j = 1) is unbiased
for the dense KD gradient softmax(s) - p. Top-k alone is biased: the tail's pull is lost every step.

No temperature: the weights estimate p at T = 1 only (the tempered teacher softmax(z / T) is not a
fixed reweighting of draws from p without its full logits).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdlib.losses._masking import valid_mask
from kdlib.losses.registry import register_loss


def sparse_kd_per_position(student_logits_nv: Tensor, ids_nm: Tensor, weights_nm: Tensor) -> Tensor:
    """(N,) -sum_j w_j log softmax(s)_j from student logits (N, V), ids (N, m) and weights (N, m).

    Written as logsumexp(s) * sum_j w_j - sum_j w_j s_j: one reduction over V and a gather of m values,
    so no (N, V) log-probabilities are made (nor kept for the backward pass). Padding entries carry
    weight 0 and add nothing, whatever their id."""
    w = weights_nm.to(student_logits_nv.dtype)
    lse = torch.logsumexp(student_logits_nv, dim=-1)
    return lse * w.sum(-1) - (w * student_logits_nv.gather(-1, ids_nm)).sum(-1)


@register_loss("kd_sparse", kind="output",
               paper="Anshumann et al. 2025 (Sparse Logit Sampling, ACL): KD from an unbiased sampled teacher cache")
def kd_sparse(student_logits: Tensor, sparse_ids: Tensor, sparse_weights: Tensor, mask: Optional[Tensor]) -> Tensor:
    """mean_pos -sum_j w_j log softmax(z_s)_j, w an unbiased sparse teacher estimate (T=1) -- Anshumann et al. 2025

    Shapes: student_logits (B,T,V); sparse_ids, sparse_weights (B,T,m) (padding: weight 0); mask (B,T).
    Equals KL(p || q) + the teacher entropy in expectation; no temperature option (see the module docstring).
    """
    V, lead = student_logits.shape[-1], student_logits.shape[:-1]
    if sparse_ids.shape[:-1] != lead or sparse_weights.shape != sparse_ids.shape:
        raise ValueError(f"sparse_ids/sparse_weights: expected {tuple(lead)} + (m,), got {tuple(sparse_ids.shape)}, "
                         f"{tuple(sparse_weights.shape)}")
    valid = valid_mask(mask, lead, student_logits.device)
    # Index the real positions first: padding never enters any arithmetic, and the (N, V) selection is the
    # only copy of the logits.
    s, ids, w = student_logits[valid], sparse_ids[valid].long(), sparse_weights.detach()[valid]
    if s.shape[0] == 0:  # 0 with the graph attached; the empty selection keeps padding garbage (NaN) out
        return s.sum() * 0.0
    if bool(((ids < 0) | (ids >= V)).any()):
        raise ValueError(f"sparse_ids: expected ids in [0, {V}) at real positions")
    return sparse_kd_per_position(s, ids, w).mean()
