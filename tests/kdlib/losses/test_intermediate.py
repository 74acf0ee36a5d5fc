"""Intermediate-layer losses against numpy hand computations, projections, padding invariance, MiniLMv2 heads."""
import numpy as np
import pytest
import torch

from kdlib.losses import (attention_kl, attention_mse, distilbert_cosine, embedding_mse, fsp, hidden_mse,
                          make_projection, minilmv2_relations, nst_mmd, pkd_patient, value_relation_kl)

B, T = 2, 3
MASK = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
PAIR = MASK[:, :, None] & MASK[:, None, :]  # (B, T, T): real query and key


def tt(x):
    return torch.tensor(x)


def lsm(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def rng(seed):
    return np.random.default_rng(seed)


def lin(proj, x):
    return x @ proj.weight.detach().double().numpy().T + proj.bias.detach().double().numpy()


def test_make_projection_shapes():
    p = make_projection(4, 6)
    assert isinstance(p, torch.nn.Linear) and tuple(p.weight.shape) == (6, 4)
    assert tuple(p(torch.zeros(2, 3, 4)).shape) == (2, 3, 6)
    with pytest.raises(ValueError):
        make_projection(0, 6)


@pytest.mark.parametrize("fn", [hidden_mse, embedding_mse])
def test_hidden_and_embedding_mse_with_projection(fn):
    r = rng(0)
    s, t = r.normal(size=(B, T, 4)), r.normal(size=(B, T, 6))
    proj = make_projection(4, 6).double()
    expected = ((lin(proj, s) - t) ** 2)[MASK].mean()
    assert fn(tt(s), tt(t), tt(MASK), proj).item() == pytest.approx(expected, rel=1e-10)
    same = r.normal(size=(B, T, 6))
    assert fn(tt(same), tt(t), tt(MASK)).item() == pytest.approx(((same - t) ** 2)[MASK].mean(), rel=1e-10)
    with pytest.raises(ValueError, match="make_projection"):
        fn(tt(s), tt(t), tt(MASK))


def test_projection_receives_gradient():
    r = rng(1)
    proj = make_projection(4, 6).double()
    hidden_mse(tt(r.normal(size=(B, T, 4))), tt(r.normal(size=(B, T, 6))), tt(MASK), proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_distilbert_cosine_value():
    r = rng(2)
    s, t = r.normal(size=(B, T, 5)), r.normal(size=(B, T, 5))
    cos = (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
    assert distilbert_cosine(tt(s), tt(t), tt(MASK)).item() == pytest.approx((1 - cos)[MASK].mean(), rel=1e-10)


def test_pkd_patient_value():
    r = rng(3)
    s, t = r.normal(size=(B, 4, 5)), r.normal(size=(B, 4, 5))
    ns = s / np.linalg.norm(s, axis=-1, keepdims=True)
    nt = t / np.linalg.norm(t, axis=-1, keepdims=True)
    assert pkd_patient(tt(s), tt(t)).item() == pytest.approx(((ns - nt) ** 2).mean(), rel=1e-10)
    as_lists = pkd_patient([tt(s[:, i]) for i in range(4)], [tt(t[:, i]) for i in range(4)])
    assert as_lists.item() == pytest.approx(((ns - nt) ** 2).mean(), rel=1e-10)


def test_fsp_value():
    r = rng(4)
    s1, s2, t1, t2 = (r.normal(size=(B, T, 4)) for _ in range(4))

    def g(a, b):
        return np.stack([a[i][MASK[i]].T @ b[i][MASK[i]] / MASK[i].sum() for i in range(B)])

    expected = ((g(s1, s2) - g(t1, t2)) ** 2).mean()
    assert fsp(tt(s1), tt(s2), tt(t1), tt(t2), tt(MASK)).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("degree,c", [(2, 0.0), (3, 1.0)])
def test_nst_mmd_value(degree, c):
    r = rng(5)
    s, t = r.normal(size=(B, T, 4)), r.normal(size=(B, T, 6))
    vals = []
    for i in range(B):
        fs = s[i][MASK[i]]
        ft = t[i][MASK[i]]
        fs, ft = fs / np.linalg.norm(fs, axis=0), ft / np.linalg.norm(ft, axis=0)  # neurons over tokens

        def k(a, b):
            return (a.T @ b + c) ** degree

        vals.append(k(ft, ft).mean() + k(fs, fs).mean() - 2 * k(fs, ft).mean())
    got = nst_mmd(tt(s), tt(t), tt(MASK), degree=degree, c=c).item()
    assert got == pytest.approx(np.mean(vals), rel=1e-10)


def test_attention_mse_tinybert_masking():
    r = rng(6)
    s, t = r.normal(size=(B, 2, T, T)), r.normal(size=(B, 2, T, T))
    s[0, 0, 0, 2] = -10000.0  # e.g. a causal/additive mask inside the real tokens
    t[1, 1, 1, 0] = -np.inf
    s0 = np.where(s <= -100, 0.0, s)
    t0 = np.where(t <= -100, 0.0, t)
    pair = np.broadcast_to(PAIR[:, None], s.shape)
    expected = ((s0 - t0) ** 2)[pair].mean()
    assert attention_mse(tt(s), tt(t), tt(MASK)).item() == pytest.approx(expected, rel=1e-10)


def _np_row_kl(log_pt, log_ps):
    """mean over heads and real queries of sum over real keys of p_t (log p_t - log p_s)."""
    vals = []
    for b in range(B):
        n = MASK[b].sum()
        for h in range(log_pt.shape[1]):
            for q in range(n):
                p = np.exp(log_pt[b, h, q, :n])
                vals.append((p * (log_pt[b, h, q, :n] - log_ps[b, h, q, :n])).sum())
    return np.mean(vals)


def _masked_lsm(scores):
    out = np.full(scores.shape, -np.inf)
    for b in range(B):
        n = MASK[b].sum()
        out[b, ..., :n] = lsm(scores[b, ..., :n])
    return out


def test_attention_kl_value():
    r = rng(7)
    ls, lt = _masked_lsm(r.normal(size=(B, 2, T, T))), _masked_lsm(r.normal(size=(B, 2, T, T)))
    got = attention_kl(tt(np.exp(ls)), tt(np.exp(lt)), tt(MASK)).item()
    assert got == pytest.approx(_np_row_kl(lt, ls), rel=1e-9)


def test_value_relation_kl_value():
    r = rng(8)
    vs, vt = r.normal(size=(B, 2, T, 3)), r.normal(size=(B, 2, T, 5))
    rel_s = _masked_lsm(vs @ vs.transpose(0, 1, 3, 2) / np.sqrt(3))
    rel_t = _masked_lsm(vt @ vt.transpose(0, 1, 3, 2) / np.sqrt(5))
    assert value_relation_kl(tt(vs), tt(vt), tt(MASK)).item() == pytest.approx(_np_row_kl(rel_t, rel_s), rel=1e-9)


def test_minilmv2_relations_with_different_head_counts():
    """Teacher 12 heads x 32 = 384 wide, student 4 heads x 32 = 128 wide, both re-split into 8 relation heads."""
    r = rng(9)
    sq, sk, sv = (r.normal(size=(B, T, 128)) for _ in range(3))
    tq, tk, tv = (r.normal(size=(B, T, 384)) for _ in range(3))

    def rel(x):
        d = x.shape[-1] // 8
        h = x.reshape(B, T, 8, d).transpose(0, 2, 1, 3)
        return _masked_lsm(h @ h.transpose(0, 1, 3, 2) / np.sqrt(d))

    expected = sum(_np_row_kl(rel(t), rel(s)) for s, t in ((sq, tq), (sk, tk), (sv, tv)))
    got = minilmv2_relations(tt(sq), tt(sk), tt(sv), tt(tq), tt(tk), tt(tv), tt(MASK), relation_heads=8)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    same = minilmv2_relations(tt(tq), tt(tk), tt(tv), tt(tq), tt(tk), tt(tv), tt(MASK), relation_heads=8)
    assert abs(same.item()) < 1e-10
    with pytest.raises(ValueError, match="divisible"):
        minilmv2_relations(tt(sq), tt(sk), tt(sv), tt(tq), tt(tk), tt(tv), tt(MASK), relation_heads=7)


def test_attention_head_mismatch_rejected():
    with pytest.raises(ValueError, match="minilmv2"):
        attention_kl(torch.rand(B, 2, T, T), torch.rand(B, 4, T, T), tt(MASK))


def _garble_tokens(x, r):
    """Garbage at padded tokens of (B, T, ...) arrays."""
    x = x.copy()
    x[~MASK] = r.normal(size=x[~MASK].shape) * 1e4
    return x


def _garble_attention(x, r):
    """Garbage at every (query, key) entry that touches a padded token of (B, H, T, T) arrays."""
    x = x.copy()
    bad = np.broadcast_to(~PAIR[:, None], x.shape)
    x[bad] = r.normal(size=int(bad.sum())) * 1e4
    return x


def _cases():
    r = rng(10)
    h4, h6 = (lambda: r.normal(size=(B, T, 4))), (lambda: r.normal(size=(B, T, 6)))
    proj = make_projection(4, 6).double()
    att_scores = lambda: r.normal(size=(B, 2, T, T))  # noqa: E731
    probs = lambda: np.exp(_masked_lsm(r.normal(size=(B, 2, T, T))))  # noqa: E731
    vals = lambda: r.normal(size=(B, 2, T, 3))  # noqa: E731
    return {
        "hidden_mse": (lambda a, m: hidden_mse(a[0], a[1], m, proj), [h4(), h6()], "tok"),
        "embedding_mse": (lambda a, m: embedding_mse(a[0], a[1], m, proj), [h4(), h6()], "tok"),
        "distilbert_cosine": (lambda a, m: distilbert_cosine(*a, m), [h4(), h4()], "tok"),
        "fsp": (lambda a, m: fsp(*a, m), [h4(), h4(), h4(), h4()], "tok"),
        "nst_mmd": (lambda a, m: nst_mmd(*a, m), [h4(), h6()], "tok"),
        "attention_mse": (lambda a, m: attention_mse(*a, m), [att_scores(), att_scores()], "att"),
        "attention_kl": (lambda a, m: attention_kl(*a, m), [probs(), probs()], "att"),
        "value_relation_kl": (lambda a, m: value_relation_kl(*a, m),
                              [vals(), vals()], "head"),
        "minilmv2_relations": (lambda a, m: minilmv2_relations(*a, m, relation_heads=2),
                               [h4(), h4(), h4(), h6(), h6(), h6()], "tok"),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_padding_garbage_changes_nothing(name):
    fn, arrays, layout = _cases()[name]
    r = rng(11)
    outs, grads = [], []
    for garbage in (False, True):
        arrs = arrays
        if garbage:
            if layout == "tok":
                arrs = [_garble_tokens(a, r) for a in arrays]
            elif layout == "att":
                arrs = [_garble_attention(a, r) for a in arrays]
            else:  # (B, H, T, d): tokens on axis 2
                arrs = [_garble_tokens(a.transpose(0, 2, 1, 3), r).transpose(0, 2, 1, 3) for a in arrays]
        tensors = [tt(np.ascontiguousarray(a)) for a in arrs]
        tensors[0].requires_grad_(True)
        out = fn(tensors, tt(MASK))
        out.backward()
        outs.append(out.item())
        g = tensors[0].grad.numpy()
        grads.append(g[np.broadcast_to(PAIR[:, None], g.shape)] if layout == "att"
                     else (g.transpose(0, 2, 1, 3)[MASK] if layout == "head" else g[MASK]))
    assert outs[0] == pytest.approx(outs[1], rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)
