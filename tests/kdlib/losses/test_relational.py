"""Relational KD (Park et al. 2019) and deep mutual learning against numpy hand computations."""
import itertools

import numpy as np
import pytest
import torch

from kdlib.losses import dml, rkd_angle, rkd_distance

MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)


def tt(x):
    return torch.tensor(x)


def huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d ** 2, d - 0.5)


def lsm(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_psi_d(x):
    n = len(x)
    d = np.array([np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j])
    return d / d.mean()


def np_psi_a(x):
    out = []
    for j, i, k in itertools.product(range(len(x)), repeat=3):
        if len({i, j, k}) == 3:
            e1 = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
            e2 = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
            out.append(e1 @ e2)
    return np.array(out)


def test_rkd_distance_value_and_scale_invariance():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 7)) * 3
    expected = huber(np_psi_d(s), np_psi_d(t)).mean()
    assert rkd_distance(tt(s), tt(t)).item() == pytest.approx(expected, rel=1e-10)
    assert rkd_distance(tt(10 * s), tt(t)).item() == pytest.approx(expected, rel=1e-8)
    assert rkd_distance(tt(2 * t), tt(t)).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_angle_value():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 6))
    expected = huber(np_psi_a(s), np_psi_a(t)).mean()
    assert rkd_angle(tt(s), tt(t)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_gradients_finite_and_batch_checked():
    rng = np.random.default_rng(2)
    s = tt(rng.normal(size=(4, 3))).requires_grad_(True)
    (rkd_distance(s, tt(rng.normal(size=(4, 5)))) + rkd_angle(s, tt(rng.normal(size=(4, 5))))).backward()
    assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError):
        rkd_distance(torch.zeros(4, 3), torch.zeros(5, 3))


def _np_dml(a, b, y):
    keep = MASK & (y != -100)
    ce = lambda z: np.mean([-lsm(z[i, j])[y[i, j]] for i, j in zip(*np.nonzero(keep))])  # noqa: E731
    kl = lambda p_from, q: (np.exp(lsm(p_from)) * (lsm(p_from) - lsm(q))).sum(-1)[MASK].mean()  # noqa: E731
    return ce(a) + kl(b, a), ce(b) + kl(a, b)


def test_dml_values_and_detached_targets():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    y = rng.integers(0, 5, size=(2, 3))
    y[0, 0] = -100
    ea, eb = _np_dml(a, b, y)
    ta, tb = tt(a).requires_grad_(True), tt(b).requires_grad_(True)
    la, lb = dml(ta, tb, tt(y), tt(MASK))
    assert la.item() == pytest.approx(ea, rel=1e-10)
    assert lb.item() == pytest.approx(eb, rel=1e-10)
    la.backward()
    assert tb.grad is None  # student b's distribution is a constant target in L_a
    assert ta.grad.abs().sum() > 0


def test_dml_padding_garbage_changes_nothing():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    y = rng.integers(0, 5, size=(2, 3))
    ref = [v.item() for v in dml(tt(a), tt(b), tt(y), tt(MASK))]
    a2, b2, y2 = a.copy(), b.copy(), y.copy()
    a2[~MASK], b2[~MASK], y2[~MASK] = 1e4, -1e4, 99
    got = [v.item() for v in dml(tt(a2), tt(b2), tt(y2), tt(MASK))]
    assert got == pytest.approx(ref, rel=1e-12)
