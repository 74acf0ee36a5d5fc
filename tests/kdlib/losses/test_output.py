"""Output-layer losses against numpy hand computations, T^2 gradient property, padding invariance, top-k KD."""
import numpy as np
import pytest
import torch

from kdlib.losses import (dynamic_temperature, get_loss, hard_ce, kd_ce, kd_dynamic_temperature, kd_kl,
                          kd_prob_shift, kd_topk, logit_mse, mlm_ce, probability_shift, teacher_annealing_ce,
                          topk_kd_error_bound)

B, T, V = 2, 3, 5
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)


def lsm(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def sm(x, axis=-1):
    return np.exp(lsm(x, axis))


def data(seed=0, v=V):
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=(B, T, v)), rng.normal(size=(B, T, v)) * 2
    labels = rng.integers(0, v, size=(B, T))
    return s, t, labels


def tt(x):
    return torch.tensor(x)


def mean_valid(per, mask=MASK):
    return per[mask].mean()


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_kd_kl_and_kd_ce_values(temp):
    s, t, _ = data()
    ps, pt = lsm(s / temp), lsm(t / temp)
    kl = temp ** 2 * mean_valid((np.exp(pt) * (pt - ps)).sum(-1))
    ce = temp ** 2 * mean_valid(-(np.exp(pt) * ps).sum(-1))
    assert kd_kl(tt(s), tt(t), tt(MASK), temperature=temp).item() == pytest.approx(kl, rel=1e-10)
    assert kd_ce(tt(s), tt(t), tt(MASK), temperature=temp).item() == pytest.approx(ce, rel=1e-10)


def test_hard_ce_and_mlm_ce_ignore_index():
    s, _, labels = data()
    labels[0, 1] = -100
    keep = MASK & (labels != -100)
    expected = np.mean([-lsm(s[b, i])[labels[b, i]] for b in range(B) for i in range(T) if keep[b, i]])
    assert hard_ce(tt(s), tt(labels), tt(MASK)).item() == pytest.approx(expected, rel=1e-10)
    assert mlm_ce(tt(s), tt(labels), tt(MASK)).item() == pytest.approx(expected, rel=1e-10)
    # sequence-level (B, C) logits without a mask
    s2, y2 = s[:, 0], labels[:, 2]
    exp2 = np.mean([-lsm(s2[b])[y2[b]] for b in range(B)])
    assert hard_ce(tt(s2), tt(y2), None).item() == pytest.approx(exp2, rel=1e-10)


def test_logit_mse_value():
    s, t, _ = data()
    assert logit_mse(tt(s), tt(t), tt(MASK)).item() == pytest.approx(((s - t) ** 2)[MASK].mean(), rel=1e-10)


@pytest.mark.parametrize("step,lam", [(0, 0.0), (5, 0.5), (10, 1.0)])
def test_teacher_annealing_ce(step, lam):
    s, t, labels = data()
    target = lam * np.eye(V)[labels] + (1 - lam) * sm(t)
    expected = mean_valid(-(target * lsm(s)).sum(-1))
    got = teacher_annealing_ce(tt(s), tt(t), tt(labels), tt(MASK), step, 10)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_probability_shift_correct_teacher_unchanged_wrong_teacher_swapped():
    t = np.array([[0.1, 3.0, -1.0, 0.5], [2.0, 0.0, 1.0, -2.0]])
    labels = np.array([1, 2])  # row 0: teacher right (argmax 1); row 1: wrong (argmax 0, gold 2)
    out = probability_shift(tt(t), tt(labels)).numpy()
    np.testing.assert_array_equal(out[0], t[0])
    np.testing.assert_array_equal(out[1], [1.0, 0.0, 2.0, -2.0])
    assert out[1].argmax() == 2
    ignored = probability_shift(tt(t), tt(np.array([-100, -100]))).numpy()
    np.testing.assert_array_equal(ignored, t)


def test_kd_prob_shift_equals_kd_on_hand_shifted_teacher():
    s, t, labels = data(1)
    shifted = t.copy()
    for b in range(B):
        for i in range(T):
            a, g = t[b, i].argmax(), labels[b, i]
            shifted[b, i, a], shifted[b, i, g] = t[b, i, g], t[b, i, a]
    pt, ps = lsm(shifted / 2), lsm(s / 2)
    expected = 4 * mean_valid((np.exp(pt) * (pt - ps)).sum(-1))
    got = kd_prob_shift(tt(s), tt(t), tt(labels), tt(MASK), temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["flsw", "cwsm"])
def test_dynamic_temperature_values(method):
    s, t, _ = data(2)
    t0, beta, gamma = 3.0, 0.5, 2.0
    if method == "flsw":
        vs = s / (np.linalg.norm(s, axis=-1, keepdims=True) + 1e-4)
        vt = t / (np.linalg.norm(t, axis=-1, keepdims=True) + 1e-4)
        w = (1 - (vs * vt).sum(-1)) ** gamma
    else:
        w = 1 / (sm(s).max(-1) + 1e-3)
    tau = t0 + beta * (w[MASK].mean() - w)
    tau_got = dynamic_temperature(tt(s), tt(t), tt(MASK), temperature=t0, method=method, beta=beta, gamma=gamma)
    np.testing.assert_allclose(tau_got.numpy()[MASK], tau[MASK], rtol=1e-10)
    pt, ps = lsm(t / tau[..., None]), lsm(s / tau[..., None])
    expected = mean_valid(tau ** 2 * (np.exp(pt) * (pt - ps)).sum(-1))
    got = kd_dynamic_temperature(tt(s), tt(t), tt(MASK), temperature=t0, method=method, beta=beta, gamma=gamma)
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", ["kd_kl", "kd_ce", "reverse_kl", "jsd", "tvd"])
def test_t_squared_scaling_keeps_gradient_magnitude(name):
    """With T^2 (T for tvd, whose gradient shrinks as 1/T) the gradient norm is the same at T = 2 and 4."""
    rng = np.random.default_rng(3)
    t = 0.5 * rng.normal(size=(4, 6, 20))  # logits small relative to T (Hinton's high-T regime)
    s0 = t + 0.1 * rng.normal(size=t.shape)
    norms = {}
    for temp in (2.0, 4.0):
        s = tt(s0).requires_grad_(True)
        get_loss(name)(s, tt(t), None, temperature=temp).backward()
        norms[temp] = s.grad.norm().item()
    assert norms[2.0] / norms[4.0] == pytest.approx(1.0, abs=0.05)  # without T^2 it would be ~4


def _topk_inputs(s, t, k, permute_seed=None):
    order = np.argsort(-t, axis=-1)[..., :k]
    if permute_seed is not None:
        order = np.random.default_rng(permute_seed).permuted(order, axis=-1)
    zk = np.take_along_axis(t, order, -1)
    lse = np.log(np.exp(t).sum(-1))
    return tt(order), tt(zk), tt(lse)


@pytest.mark.parametrize("mode", ["renormalize", "rest_bucket"])
@pytest.mark.parametrize("temp", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_with_k_equal_v_is_dense_kd(mode, temp, dtype):
    s, t, _ = data(4, v=7)
    ids, zk, lse = _topk_inputs(s, t, 7, permute_seed=1)
    dense = kd_kl(tt(s).to(dtype), tt(t).to(dtype), tt(MASK), temperature=temp)
    got = kd_topk(tt(s).to(dtype), ids, zk.to(dtype), lse.to(dtype), tt(MASK), temperature=temp, missing_mass=mode)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(dense.item(), abs=tol, rel=tol)


def test_topk_hand_values_and_bound_for_k_below_v():
    rng = np.random.default_rng(5)
    v, k = 40, 6
    t = rng.normal(size=(B, T, v)) * 3
    s = rng.normal(size=(B, T, v)) * 2
    ids, zk, lse = _topk_inputs(s, t, k)
    idx = ids.numpy()
    dense = kd_kl(tt(s), tt(t), tt(MASK)).item()
    log_q = lsm(s)
    lq_k = np.take_along_axis(log_q, idx, -1)
    # renormalize: KL(softmax(z_K) || q) over K
    lp = lsm(zk.numpy())
    renorm = mean_valid((np.exp(lp) * (lp - lq_k)).sum(-1))
    # rest bucket: teacher p_K = exp(z_K - lse), rest r; student rest r_s
    p_k = np.exp(zk.numpy() - lse.numpy()[..., None])
    r = 1 - p_k.sum(-1)
    r_s = 1 - np.exp(lq_k).sum(-1)
    rest = mean_valid((p_k * (np.log(p_k) - lq_k)).sum(-1) + r * (np.log(r) - np.log(r_s)))
    got_renorm = kd_topk(tt(s), ids, zk, lse, tt(MASK), missing_mass="renormalize").item()
    got_rest = kd_topk(tt(s), ids, zk, lse, tt(MASK), missing_mass="rest_bucket").item()
    assert got_renorm == pytest.approx(renorm, rel=1e-9)
    assert got_rest == pytest.approx(rest, rel=1e-9)
    # documented bounds: rest bucket never exceeds dense and |error| <= bound, both modes
    assert got_rest <= dense + 1e-12
    for mode, got in (("renormalize", got_renorm), ("rest_bucket", got_rest)):
        bound = topk_kd_error_bound(tt(s), ids, zk, lse, tt(MASK), missing_mass=mode).item()
        assert abs(got - dense) <= bound + 1e-12, (mode, got, dense, bound)
    # the bound shrinks with the missing mass: at k = V - 1 it is far smaller than at k = 6
    ids2, zk2, lse2 = _topk_inputs(s, t, v - 1)
    small = topk_kd_error_bound(tt(s), ids2, zk2, lse2, tt(MASK), missing_mass="rest_bucket").item()
    assert small < 0.1 * topk_kd_error_bound(tt(s), ids, zk, lse, tt(MASK), missing_mass="rest_bucket").item()
    assert abs(kd_topk(tt(s), ids2, zk2, lse2, tt(MASK), missing_mass="rest_bucket").item() - dense) <= small + 1e-12


def test_topk_rest_bucket_at_temperature_exact_for_flat_tail():
    """The T != 1 approximation (missing mass spread evenly over the n missing ids) is exact for a flat tail."""
    rng = np.random.default_rng(6)
    v, k, temp = 12, 4, 2.0
    t = np.full((B, T, v), -1.0)
    t[..., :k] = rng.normal(size=(B, T, k)) + 2.0
    s = rng.normal(size=(B, T, v))
    ids, zk, lse = _topk_inputs(s, t, k)
    dense = kd_kl(tt(s), tt(t), tt(MASK), temperature=temp).item()
    got = kd_topk(tt(s), ids, zk, lse, tt(MASK), temperature=temp, missing_mass="rest_bucket").item()
    assert got <= dense + 1e-12  # lumping the tail can only lose information
    # with a flat tail the teacher's tail is uniform, so the only loss is the student's within-tail KL term
    pt = sm(t / temp)
    q = sm(s / temp)
    r, r_s = pt[..., k:].sum(-1), q[..., k:].sum(-1)
    cond = (pt[..., k:] / r[..., None] * (np.log(pt[..., k:] / r[..., None]) - np.log(q[..., k:] / r_s[..., None]))).sum(-1)
    assert dense - got == pytest.approx(temp ** 2 * mean_valid(r * cond), rel=1e-8)


def _garbage(x, rng, mask=MASK):
    x = x.copy()
    x[~mask] = rng.normal(size=x[~mask].shape) * 1e4
    return x


OUTPUT_CASES = ["kd_kl", "kd_ce", "hard_ce", "mlm_ce", "logit_mse", "teacher_annealing_ce", "kd_prob_shift",
                "kd_dynamic_temperature", "kd_topk_renormalize", "kd_topk_rest_bucket"]


def _call(case, s, t, labels, ids=None, zk=None, lse=None):
    m = tt(MASK)
    if case.startswith("kd_topk"):
        return kd_topk(s, ids, zk, lse, m, temperature=2.0, missing_mass=case[len("kd_topk_"):])
    if case in ("hard_ce", "mlm_ce"):
        return get_loss(case)(s, labels, m)
    if case == "teacher_annealing_ce":
        return teacher_annealing_ce(s, t, labels, m, 3, 10)
    if case == "kd_prob_shift":
        return kd_prob_shift(s, t, labels, m, temperature=2.0)
    if case == "logit_mse":
        return logit_mse(s, t, m)
    if case == "kd_dynamic_temperature":
        return kd_dynamic_temperature(s, t, m, temperature=2.0, method="cwsm")
    return get_loss(case)(s, t, m, temperature=2.0)


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_padding_garbage_changes_nothing(case):
    rng = np.random.default_rng(7)
    v, k = 9, 4
    s, t, labels = data(8, v=v)
    ids, zk, lse = _topk_inputs(s, t, k)
    outs, grads = [], []
    for garbage in (False, True):
        s_, t_, y_ = s, t, labels
        ids_, zk_, lse_ = ids.numpy(), zk.numpy(), lse.numpy()
        if garbage:
            s_, t_, zk_ = _garbage(s, rng), _garbage(t, rng), _garbage(zk_, rng)
            lse_ = lse_.copy()
            lse_[~MASK] = 1e6
            y_, ids_ = labels.copy(), ids_.copy()
            y_[~MASK] = 10 ** 6  # out of range on purpose
            ids_[~MASK] = -5
            s_[0, 0, 0] = s[0, 0, 0]  # real positions untouched
        st = tt(s_).requires_grad_(True)
        out = _call(case, st, tt(t_), tt(y_), tt(ids_), tt(zk_), tt(lse_))
        out.backward()
        outs.append(out.item())
        grads.append(st.grad.numpy()[MASK])
    assert outs[0] == pytest.approx(outs[1], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_temperature_must_be_positive():
    s, t, _ = data()
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(tt(s), tt(t), tt(MASK), temperature=0.0)
