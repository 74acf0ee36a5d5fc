"""The ULD loss on a top-k cache (Boizard et al. 2024): values against float64 numpy hand computations,
equality with the full sorted-L1 distance when nothing is truncated, the gradient, independence of ids,
zero at a matching sorted top-k, and bf16 student logits within a bound derived from bf16 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib.losses import get_spec, uld


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1)
    return m + np.log(np.exp(x - m[..., None]).sum(-1))


def uld_by_hand(s: np.ndarray, z: np.ndarray, lse: np.ndarray, mask: np.ndarray) -> float:
    """Float64 loop over the aligned positions, straight from the definition."""
    per = []
    for b, t in zip(*np.nonzero(mask)):
        k = z.shape[-1]
        q = np.sort(softmax(s[b, t]))[::-1]
        q_k = np.concatenate([q[:k], np.zeros(max(0, k - len(q)))])
        p_k = np.sort(np.exp(z[b, t] - lse[b, t]))[::-1]
        r_t = max(0.0, 1.0 - p_k.sum())
        r_s = q[k:].sum()  # the student's tail, summed directly (0 when V_s <= k)
        per.append(np.abs(q_k - p_k).sum() + abs(r_s - r_t))
    return float(np.mean(per)) if per else 0.0


def teacher_cache(rng, B, T, V_t, k, *, shuffle=True):
    """Full teacher logits (B,T,V_t), their top-k values in a shuffled (not sorted) order, and the lse."""
    full = rng.normal(size=(B, T, V_t)) * 2.0
    lse = logsumexp(full)
    top = -np.sort(-full, axis=-1)[..., :k]
    if shuffle:
        top = np.take_along_axis(top, rng.permuted(np.tile(np.arange(k), (B, T, 1)), axis=-1), -1)
    return full, top, lse


def garbage_mask(B, T):
    """Padding at the end of row 1 and unaligned positions inside rows 0 and 2."""
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 4:] = 0  # padding
    mask[0, 1] = mask[2, 3] = 0  # inside the sequence, but not the end of an aligned character span
    return mask


@pytest.mark.parametrize("V_s", [7, 3])  # more and fewer student ids than the k = 4 cached values
def test_value_by_hand_with_padding_unaligned_and_unsorted_cache(V_s):
    rng = np.random.default_rng(0)
    B, T, V_t, k = 3, 6, 11, 4
    s = rng.normal(size=(B, T, V_s)) * 1.5
    _, z, lse = teacher_cache(rng, B, T, V_t, k)
    assert not (np.diff(z, axis=-1) <= 0).all()  # the cache is not stored sorted
    mask = garbage_mask(B, T)
    off = mask == 0
    s[off], z[off], lse[off] = np.nan, np.inf, -np.inf  # garbage at excluded positions must not matter
    s[0, 1, 0] = np.inf
    want = uld_by_hand(s, z, lse, mask)
    st = torch.tensor(s, requires_grad=True)
    got = uld(st, torch.tensor(z), torch.tensor(lse), torch.tensor(mask))
    assert got.dtype == torch.float64
    # float64 inputs: the value (at most 2 per position) is exact up to a few ulps of its terms.
    assert abs(got.item() - want) <= 1e-13 * (1.0 + abs(want))
    got.backward()
    g = st.grad.numpy()
    assert np.isfinite(g).all() and (g[off] == 0).all()


@pytest.mark.parametrize("V_s", [9, 6])  # V_s = k and V_s < k
def test_equals_full_sorted_l1_when_k_is_the_teacher_vocabulary(V_s):
    rng = np.random.default_rng(1)
    B, T, V_t = 2, 5, 9
    s = rng.normal(size=(B, T, V_s)) * 2.0
    full, z, lse = teacher_cache(rng, B, T, V_t, V_t)  # k = V_t: every teacher probability is cached
    n = max(V_s, V_t)
    per = []
    for b in range(B):
        for t in range(T):
            q = np.sort(softmax(s[b, t]))[::-1]
            p = np.sort(softmax(full[b, t]))[::-1]
            q, p = np.pad(q, (0, n - V_s)), np.pad(p, (0, n - V_t))
            per.append(np.abs(q - p).sum())
    want = float(np.mean(per))
    got = uld(torch.tensor(s), torch.tensor(z), torch.tensor(lse), torch.ones(B, T)).item()
    # Both tails vanish (r_t = 1 - sum p is 0 up to float64 rounding of a sum of V_t terms).
    assert abs(got - want) <= 1e-13 * (1.0 + want)


def test_gradient_matches_float64_finite_differences():
    rng = np.random.default_rng(2)
    B, T, V_s, V_t, k = 2, 4, 8, 13, 5
    s = rng.normal(size=(B, T, V_s))
    _, z, lse = teacher_cache(rng, B, T, V_t, k)
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 2:] = 0
    st = torch.tensor(s, requires_grad=True)
    uld(st, torch.tensor(z), torch.tensor(lse), torch.tensor(mask)).backward()
    h = 1e-6
    fd = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        sp, sm = s.copy(), s.copy()
        sp[idx] += h
        sm[idx] -= h
        fd[idx] = (uld_by_hand(sp, z, lse, mask) - uld_by_hand(sm, z, lse, mask)) / (2 * h)
    # Central differences: truncation O(h^2 * |f'''|) ~ 1e-12, rounding ~ 1e-16 / h = 1e-10 (the loss is
    # piecewise smooth; random inputs put no tie or zero difference within h of these points).
    assert np.abs(st.grad.numpy() - fd).max() <= 1e-8
    assert np.abs(fd).max() > 1e-2  # a non-trivial gradient
    assert (st.grad.numpy()[1, 2:] == 0).all()


def test_invariant_to_student_vocabulary_and_cache_order_permutations():
    rng = np.random.default_rng(3)
    B, T, V_s, V_t, k = 3, 5, 10, 16, 6
    s = rng.normal(size=(B, T, V_s)) * 2.0
    _, z, lse = teacher_cache(rng, B, T, V_t, k)
    mask = torch.tensor(garbage_mask(B, T))
    base = uld(torch.tensor(s), torch.tensor(z), torch.tensor(lse), mask).item()
    s_perm = s[..., rng.permutation(V_s)]  # the student's ids relabelled
    z_perm = np.take_along_axis(z, rng.permuted(np.tile(np.arange(k), (B, T, 1)), axis=-1), -1)
    got = uld(torch.tensor(s_perm), torch.tensor(z_perm), torch.tensor(lse), mask).item()
    # Same sorted values; only the softmax's summation order changes (float64 rounding).
    assert abs(got - base) <= 1e-14 * (1.0 + base)
    assert base > 0.05


def test_zero_when_sorted_top_k_and_tail_mass_match():
    rng = np.random.default_rng(4)
    B, T, V_s, V_t, k = 2, 3, 9, 15, 4
    s = rng.normal(size=(B, T, V_s))
    s[..., :k] += 4.0  # a peaked student, so its tail mass spread over the teacher's ids stays below q_(k)
    q = np.sort(softmax(s), axis=-1)[..., ::-1]
    full = np.zeros((B, T, V_t))
    for b in range(B):
        for t in range(T):
            tail = rng.dirichlet(np.ones(V_t - k)) * q[b, t, k:].sum()  # a different tail, same total
            assert tail.max() < q[b, t, k - 1]
            p = np.concatenate([q[b, t, :k], tail])
            full[b, t] = np.log(p[rng.permutation(V_t)]) + 3.7  # logits are log p up to a shift
    lse = logsumexp(full)
    z = -np.sort(-full, axis=-1)[..., :k][..., ::-1].copy()  # ascending: not the loss's order
    got = uld(torch.tensor(s), torch.tensor(z), torch.tensor(lse), torch.ones(B, T)).item()
    assert abs(got) <= 1e-14 * k  # k + 1 differences of equal values, each a few ulps of numbers <= 1
    # and a different student is not at zero
    other = uld(torch.tensor(s * 0.5), torch.tensor(z), torch.tensor(lse), torch.ones(B, T)).item()
    assert other > 0.1


def test_bf16_student_logits_within_the_rounding_bound():
    rng = np.random.default_rng(5)
    B, T, V_s, V_t, k = 3, 6, 64, 50, 8
    s = rng.normal(size=(B, T, V_s)) * 3.0
    _, z, lse = teacher_cache(rng, B, T, V_t, k)
    mask = garbage_mask(B, T)
    z32, lse32, m = torch.tensor(z, dtype=torch.float32), torch.tensor(lse, dtype=torch.float32), torch.tensor(mask)
    s_bf16 = torch.tensor(s, dtype=torch.float32).to(torch.bfloat16)
    got = uld(s_bf16, z32, lse32, m)
    assert got.dtype == torch.float32  # upcast before the softmax
    want = uld_by_hand(s, z, lse, mask)
    # Rounding moves each logit by delta_j, |delta_j| <= 2^-8 |s_j| (bf16 keeps 8 significand bits). Then
    # q'_j / q_j lies in [e^{-2d}, e^{2d}] with d = max_j |delta_j|, so ||q' - q||_1 <= e^{2d} - 1; sorting
    # and bucketing the tail do not increase an L1 distance, and the loss is 1-Lipschitz in it. Per
    # aligned position the bound is e^{2 d_pos} - 1, averaged; float32 arithmetic adds ~ (V_s + k) * 2^-24.
    d = np.abs(s_bf16.double().numpy() - s).max(-1)
    assert (d <= 2.0 ** -8 * np.abs(s).max(-1)).all()
    bound = float(np.mean(np.expm1(2 * d[mask == 1]))) + (V_s + k) * 2.0 ** -24 * 4
    assert abs(got.item() - want) <= bound
    assert bound < 0.1 * want  # the bound is informative at this magnitude
    # and it is the float32 value of the rounded logits (not a bf16 softmax)
    exact = uld_by_hand(s_bf16.double().numpy(), z, lse, mask)
    assert abs(got.item() - exact) <= (V_s + k) * 2.0 ** -24 * 4


def test_all_unaligned_is_zero_with_gradient_and_shapes_are_checked():
    s = torch.full((2, 3, 5), float("nan"), dtype=torch.float64, requires_grad=True)
    z, lse = torch.full((2, 3, 4), float("inf"), dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    loss = uld(s, z, lse, torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()
    with pytest.raises(ValueError, match="teacher_lse"):
        uld(s, z, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        uld(s, z, lse, torch.ones(3, 2))
    spec = get_spec("uld")
    assert spec.kind == "output" and " -- " in spec.formula and spec.options() == {}
    assert spec.inputs() == ["student_logits", "topk_logits", "teacher_lse", "aligned_mask"]
