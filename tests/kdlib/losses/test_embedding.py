"""Sentence-embedding losses (kdlib/losses/embedding.py) against float64 numpy hand computations, and
their input plans (pooled embeddings from the cache or the online teacher)."""
import numpy as np
import pytest
import torch
from torch import nn

from kdlib.losses import get_loss, pooled_contrastive, pooled_cosine, pooled_mse, pooled_relation_kl
from kdlib.training.objective_plan import plan_objective, projection_groups, reads
from kdlib.training.providers import BATCH, Offer

NAMES = ["pooled_mse", "pooled_cosine", "pooled_contrastive", "pooled_relation_kl"]
PROJECTED = ["pooled_mse", "pooled_cosine", "pooled_contrastive"]  # compare s_i W with t_j unit by unit


def tt(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def data(n=5, ds=6, dt=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, ds)), rng.normal(size=(n, dt))


def unit(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True))


def lse(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------- hand computations (float64 numpy)

def np_mse(s, t):
    terms = (s - t) ** 2
    return terms.mean(), terms.sum()


def np_cosine(s, t):
    cos = (s * t).sum(-1) / np.sqrt((s * s).sum(-1) * (t * t).sum(-1))
    return (1.0 - cos).mean(), (1.0 + np.abs(cos)).sum()


def np_contrastive(s, t, tau, symmetric=False):
    logits = unit(s) @ unit(t).T / tau
    s_to_t = (lse(logits) - np.diag(logits)).mean()
    t_to_s = (lse(logits.T) - np.diag(logits)).mean()
    value = 0.5 * (s_to_t + t_to_s) if symmetric else s_to_t
    return value, 3.0 * np.abs(logits).sum()


def np_relation_kl(s, t, tau):
    n = s.shape[0]

    def log_probs(x):
        u = unit(x)
        rows = []
        for i in range(n):
            sims = np.array([u[i] @ u[j] for j in range(n) if j != i]) / tau
            rows.append(sims - lse(sims))
        return np.array(rows)

    lp, lq = log_probs(t), log_probs(s)
    p = np.exp(lp)
    terms = p * (lp - lq)
    return terms.sum(-1).mean(), (p * (np.abs(lp) + np.abs(lq))).sum()


def near(got, want_and_scale, factor=1e-12):
    want, scale = want_and_scale
    got = float(got.detach()) if isinstance(got, torch.Tensor) else float(got)
    assert abs(got - want) <= factor * scale, (got, want, scale)


# ---------------------------------------------------------------- values

def test_pooled_mse_and_cosine_values():
    s, t = data()
    near(pooled_mse(tt(s), tt(t)), np_mse(s, t))
    near(pooled_cosine(tt(s), tt(t)), np_cosine(s, t))
    near(pooled_cosine(tt(3.0 * t), tt(t)), (0.0, t.shape[0]))  # cosine ignores scale


@pytest.mark.parametrize("tau", [0.05, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_pooled_contrastive_value(tau, symmetric):
    s, t = data()
    near(pooled_contrastive(tt(s), tt(t), temperature=tau, symmetric=symmetric), np_contrastive(s, t, tau, symmetric))


def test_pooled_contrastive_lower_when_student_matches_teacher():
    _, t = data(n=8, seed=1)
    perm = np.roll(np.arange(8), 1)  # every student row paired with another sequence's teacher embedding
    matched = float(pooled_contrastive(tt(t), tt(t)))
    shuffled = float(pooled_contrastive(tt(t[perm]), tt(t)))
    near(matched, np_contrastive(t, t, 0.05))
    near(shuffled, np_contrastive(t[perm], t, 0.05))
    assert matched < 1.0 < shuffled, (matched, shuffled)  # positive on the diagonal vs on a wrong row


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_pooled_relation_kl_value_with_different_widths(tau):
    s, t = data(ds=4, dt=7)
    near(pooled_relation_kl(tt(s), tt(t), temperature=tau), np_relation_kl(s, t, tau))


def test_pooled_relation_kl_zero_when_student_equals_teacher():
    _, t = data(n=6, dt=5, seed=2)
    _, scale = np_relation_kl(t, t, 0.05)
    near(pooled_relation_kl(tt(t), tt(t)), (0.0, scale))
    # same cosines in another width and scale: an orthogonal map into 8 units, times 2
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(8, 8)))
    wider = 2.0 * t @ q[:5]
    near(pooled_relation_kl(tt(wider), tt(t)), (0.0, scale))


# ---------------------------------------------------------------- projection, gradients, errors

@pytest.mark.parametrize("name", PROJECTED)
def test_projection_path_equals_hand_computation_of_projected_student(name):
    s, t = data(ds=4, dt=6)
    torch.manual_seed(0)
    proj = nn.Linear(4, 6).double()
    w, b = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    sw = s @ w.T + b
    hand = {"pooled_mse": np_mse, "pooled_cosine": np_cosine,
            "pooled_contrastive": lambda a, c: np_contrastive(a, c, 0.05)}[name]
    loss = get_loss(name)(tt(s), tt(t), proj)
    near(loss, hand(sw, t))
    loss.backward()
    assert proj.weight.grad is not None and float(proj.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_student_not_teacher(name):
    s_np, t_np = data(ds=6, dt=6, seed=4)
    s, t = tt(s_np, grad=True), tt(t_np, grad=True)
    loss = get_loss(name)(s, t)
    assert loss.dtype == torch.float64
    loss.backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", PROJECTED)
def test_width_mismatch_without_projection_is_rejected(name):
    s, t = data(ds=4, dt=6)
    with pytest.raises(ValueError, match=rf"{name}: student width 4 != teacher width 6; .*make_projection\(4, 6\)"):
        get_loss(name)(tt(s), tt(t))


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_batch_size_errors(name):
    with pytest.raises(ValueError, match="equal N"):
        get_loss(name)(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        get_loss(name)(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3))


def test_in_batch_losses_need_enough_sequences():
    one, two = torch.ones(1, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="pooled_contrastive: expected at least 2 sequences"):
        pooled_contrastive(one, one)
    with pytest.raises(ValueError, match="pooled_relation_kl: expected at least 3 sequences"):
        pooled_relation_kl(two, two)
    with pytest.raises(ValueError, match="temperature"):
        pooled_contrastive(two, two, temperature=0.0)


# ---------------------------------------------------------------- input plans

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("offer", [Offer(online_teacher=False, cached=frozenset({"teacher_pooled"})),
                                   Offer(online_teacher=True, cached=frozenset())], ids=["cached", "online"])
def test_plan_reads_pooled_embeddings_from_cache_or_online_teacher(name, offer):
    plan = plan_objective(name, offer)
    want = ["student_pooled", "teacher_pooled"] + (["projection"] if name in PROJECTED else [])
    assert plan.inputs == want and plan.scope == BATCH and len(plan.sites) == 1
    assert reads([plan], "student") == {"hidden"} and reads([plan], "teacher") == {"hidden"}
    assert projection_groups([plan]) == (["hidden"] if name in PROJECTED else [])


@pytest.mark.parametrize("name", NAMES)
def test_plan_without_pooled_teacher_names_where_to_get_it(name):
    with pytest.raises(ValueError, match=rf"{name} needs teacher sentence embeddings \(teacher_pooled\): "
                                         r"set online_teacher: true, or .*teacher_outputs\.pooled"):
        plan_objective(name, Offer(online_teacher=False, cached=frozenset({"teacher_hidden_4"})))
