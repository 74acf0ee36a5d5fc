"""Universal Logit Distillation on a top-k teacher cache (Boizard et al. 2024, arXiv:2402.12030).

ULD distils across tokenizers: the teacher's and the student's vocabularies differ, so no id of one
means anything in the other. It sorts each distribution's probabilities in decreasing order and takes
the L1 distance between the sorted vectors (zero-padded to a common length), the closed form of the
Wasserstein-1 distance the paper uses; no vocabulary mapping is needed, and no id is ever read.

On a top-k cache the teacher's probabilities beyond the k cached ones are unknown (only their total,
r_t = 1 - sum_i p_i, follows from the stored full-vocabulary lse), so the tails are compared as one
bucket. Per position, with p_(1) >= ... >= p_(k) the cached teacher probabilities exp(z - lse) sorted
(the cache need not be sorted: q8 storage orders by id) and q_(1) >= ... >= q_(k) the student's k
largest probabilities (softmax over V_s; zeros appended when V_s < k):
    loss = sum_{i<=k} |q_(i) - p_(i)| + |r_s - r_t|,   r_s = 1 - sum_i q_(i),  r_t = max(0, 1 - sum_i p_i).
By the triangle inequality (sum_{i>k} |q_(i) - p_(i)| >= |sum_{i>k} q_(i) - sum_{i>k} p_(i)|) this is a
lower bound of the full sorted-L1 ULD distance; it equals it when k >= both vocabularies (both tails
empty), and whenever the two tails are each other's sorted match in the sense that every tail difference
has one sign.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.losses._masking import valid_mask
from kdlib.losses.registry import register_loss


def uld_per_position(s: Tensor, z: Tensor, lse: Tensor) -> Tensor:
    """(N,) bucketed sorted-L1 of the module docstring from student logits (N, V_s), cached teacher
    logits (N, k) in any order and the teacher lse (N,); computed in at least float32."""
    dt = torch.promote_types(s.dtype, torch.float32)
    k, v_s = z.shape[-1], s.shape[-1]
    q = torch.softmax(s.to(dt), dim=-1)
    q_k = q.topk(min(k, v_s), dim=-1, sorted=True).values
    if v_s < k:  # the student has fewer ids than the cache: its missing ranks hold probability 0
        q_k = F.pad(q_k, (0, k - v_s))
    p_k = torch.exp(z.to(dt) - lse.to(dt).unsqueeze(-1)).sort(dim=-1, descending=True).values
    r_t = (1.0 - p_k.sum(-1)).clamp(min=0.0)
    r_s = (1.0 - q_k.sum(-1)).clamp(min=0.0) if v_s > k else torch.zeros_like(r_t)  # no tail when V_s <= k
    return (q_k - p_k).abs().sum(-1) + (r_s - r_t).abs()


@register_loss("uld", kind="output",
               paper="Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit "
                     "Distillation Loss for LLMs (arXiv:2402.12030), on a top-k cache with one tail bucket")
def uld(student_logits: Tensor, topk_logits: Tensor, teacher_lse: Tensor, aligned_mask: Tensor) -> Tensor:
    """mean_pos sum_i |q_(i) - p_(i)| + |r_s - r_t| over sorted top-k probabilities, tails as one bucket -- Boizard et al. 2024 (ULD)

    Shapes: student_logits (B,T,V_s) in the student's vocabulary; topk_logits (B,T,k) the teacher's cached
    top-k logits (any order; ids are never needed); teacher_lse (B,T) the teacher's full-vocabulary
    log-sum-exp at T=1, placed at the student positions compared; aligned_mask (B,T), 1 where a position
    takes part (end of an aligned character span; the attention mask for a same-tokenizer batch).
    No temperature (the cached lse is at T=1). A lower bound of the full sorted-L1 distance, equal to it
    when k >= both vocabularies (module docstring). Value in at least float32; 0 when nothing is aligned.
    """
    lead = student_logits.shape[:-1]
    if topk_logits.shape[:-1] != lead or teacher_lse.shape != lead or topk_logits.dim() != student_logits.dim():
        raise ValueError(f"topk_logits: expected {tuple(lead)} + (k,), teacher_lse: expected {tuple(lead)}; "
                         f"got {tuple(topk_logits.shape)}, {tuple(teacher_lse.shape)}")
    valid = valid_mask(aligned_mask, lead, student_logits.device)
    # Select the aligned positions first: nothing at an unaligned or padded one enters any arithmetic.
    s = student_logits[valid]
    z, lse = topk_logits.detach()[valid], teacher_lse.detach()[valid]
    per = uld_per_position(s, z, lse)
    return per.sum() / max(per.shape[0], 1)  # an empty selection gives 0 with a (zero) gradient path
