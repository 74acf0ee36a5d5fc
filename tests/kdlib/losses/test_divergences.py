"""reverse_kl, jsd, tvd (kdlib/losses/divergences.py): float64 hand computations, the divergences' properties
(symmetry, bounds, zero at equality, the JSD endpoints), temperature scaling, and their chunked twins against
the dense losses in value and in gradients w.r.t. hidden, weight and bias."""
import math

import numpy as np
import pytest
import torch

from kdlib.losses import get_chunked, get_loss, get_spec, jsd, kd_kl, known_losses, reverse_kl, tvd
from kdlib.losses.chunked import FactoredLogits, fused_loss
from kdlib.losses.objectives import ObjectiveConfig, chunk_term, evaluate_objective
from tests.kdlib.losses.test_chunked import assert_close
from tests.kdlib.losses.test_output import MASK, data, lsm, tt

V = 23  # vocabulary of the hand-computation fixture (B, T = 2, 3 from test_output; MASK pads one position)
LOSSES = {"reverse_kl": reverse_kl, "jsd": jsd, "tvd": tvd}


def hand(name, s, t, temp, beta=0.5):
    """(mean over MASK of the loss, the magnitude of the summed terms) in float64 numpy."""
    lq, lp = lsm(s / temp), lsm(t / temp)
    q, p = np.exp(lq), np.exp(lp)
    scale = temp if name == "tvd" else temp ** 2
    if name == "tvd":
        terms = 0.5 * np.abs(p - q)
    elif name == "reverse_kl" or (name == "jsd" and beta == 1):
        terms = q * (lq - lp)
    elif name == "kd_kl" or (name == "jsd" and beta == 0):
        terms = p * (lp - lq)
    else:  # the mixture in probability space (the loss works in log space)
        m = beta * p + (1 - beta) * q
        terms = beta * p * np.log(p / m) + (1 - beta) * q * np.log(q / m)
    per = scale * terms.sum(-1)
    # rounding of each term is relative to p, q times the log-probabilities it came from
    magnitude = scale * ((p + q) * (1 + np.abs(lp) + np.abs(lq))).sum(-1)[MASK].max()
    return per[MASK].mean(), magnitude


def close_to_hand(got, want, magnitude):
    assert abs(got - want) <= 1e-12 * (1 + magnitude), (got, want, magnitude)


def with_garbage_at_padding(x):
    """A leaf tensor of ``x`` with NaN / inf at the padded position: it must not reach value or gradient."""
    x = tt(x.copy())
    x[~tt(MASK)] = float("nan")
    x[1, 2, 0] = float("inf")
    return x.requires_grad_(True)


CASES = [("reverse_kl", 1.0, None), ("reverse_kl", 2.5, None), ("tvd", 1.0, None), ("tvd", 0.7, None)] + [
    ("jsd", temp, beta) for temp in (1.0, 2.5) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("name, temp, beta", CASES)
def test_value_equals_float64_hand_computation_and_padding_never_contributes(name, temp, beta):
    s, t, _ = data(0, v=V)
    want, magnitude = hand(name, s, t, temp, 0.5 if beta is None else beta)
    opts = {"temperature": temp} if beta is None else {"temperature": temp, "beta": beta}
    s_garbage, t_garbage = with_garbage_at_padding(s), with_garbage_at_padding(t)
    got = LOSSES[name](s_garbage, t_garbage, tt(MASK), **opts)
    close_to_hand(got.item(), want, magnitude)
    got.backward()
    assert torch.isfinite(s_garbage.grad).all() and not s_garbage.grad[~tt(MASK)].any()
    assert t_garbage.grad is None  # the teacher is a constant


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_jsd_half_is_symmetric_zero_on_equal_and_bounded(temp):
    s, t, _ = data(1, v=V)
    forward, backward = jsd(tt(s), tt(t), tt(MASK), temperature=temp), jsd(tt(t), tt(s), tt(MASK), temperature=temp)
    assert_close(forward, backward, 1e-13)
    assert abs(jsd(tt(s), tt(s), tt(MASK), temperature=temp).item()) <= 1e-14 * temp ** 2
    assert 0 < forward.item() <= temp ** 2 * math.log(2)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.8])
def test_jsd_at_most_the_binary_entropy_reached_by_disjoint_supports(beta):
    """JSD_beta <= H(beta) = -beta ln beta - (1-beta) ln(1-beta) (ln 2 at beta = 0.5), at T = 1."""
    entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    s, t, _ = data(2, v=V)
    assert 0 < jsd(tt(s * 5), tt(t * 5), None, beta=beta).item() <= entropy
    # near-disjoint supports: each side puts all but e^-80 of its mass on its own id
    s_far, t_far = np.zeros((1, 4, V)), np.zeros((1, 4, V))
    s_far[..., 0], t_far[..., 1] = 80.0, 80.0
    got = jsd(tt(s_far), tt(t_far), None, beta=beta).item()
    assert entropy - 1e-9 <= got <= entropy + 1e-14


def test_tvd_is_in_the_unit_interval_symmetric_and_zero_on_equal():
    s, t, _ = data(3, v=V)
    for scale in (0.1, 1.0, 10.0):
        value = tvd(tt(s * scale), tt(t * scale), tt(MASK)).item()
        assert 0 < value <= 1
        assert_close(tvd(tt(t * scale), tt(s * scale), tt(MASK)), torch.tensor(value, dtype=torch.float64), 1e-14)
    assert tvd(tt(s), tt(s), tt(MASK)).item() == 0.0
    s_far, t_far = np.zeros((1, 4, V)), np.zeros((1, 4, V))
    s_far[..., 0], t_far[..., 1] = 80.0, 80.0
    assert 1 - 1e-12 <= tvd(tt(s_far), tt(t_far), None).item() <= 1
    assert 0 < tvd(tt(s), tt(t), tt(MASK), temperature=3.0).item() <= 3.0  # T * TVD lies in [0, T]


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_reverse_kl_is_forward_kl_with_the_arguments_swapped(temp):
    s, t, _ = data(4, v=V)
    assert_close(reverse_kl(tt(s), tt(t), tt(MASK), temperature=temp), kd_kl(tt(t), tt(s), tt(MASK), temperature=temp),
                 1e-13)
    assert reverse_kl(tt(s), tt(s), tt(MASK), temperature=temp).item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_jsd_endpoints_are_forward_and_reverse_kl_and_the_limits_of_the_scaled_jsd(temp):
    """beta = 0 / 1 are KL(p || q) / KL(q || p) themselves: JSD_beta / beta and JSD_beta / (1 - beta) tend to them."""
    s, t, _ = data(5, v=V)
    args = (tt(s), tt(t), tt(MASK))
    forward, backward = kd_kl(*args, temperature=temp), reverse_kl(*args, temperature=temp)
    assert torch.equal(jsd(*args, temperature=temp, beta=0.0), forward)
    assert torch.equal(jsd(*args, temperature=temp, beta=1.0), backward)
    eps = 1e-6
    for got, want in ((jsd(*args, temperature=temp, beta=eps) / eps, forward),
                      (jsd(*args, temperature=temp, beta=1 - eps) / eps, backward)):
        assert abs(got.item() - want.item()) <= 1e-4 * (1 + want.item())  # the O(beta) term of the expansion


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_beta_raises_naming_it_dense_and_chunked(beta):
    s, t, _ = data(0, v=V)
    with pytest.raises(ValueError, match="^beta: expected"):
        jsd(tt(s), tt(t), tt(MASK), beta=beta)
    with pytest.raises(ValueError, match="^beta: expected"):
        get_chunked("jsd")(factored(), teacher_2x9(), MASK_2x9, beta=beta)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_temperature_and_teacher_shape_raise(name):
    s, t, _ = data(0, v=V)
    with pytest.raises(ValueError, match="temperature"):
        LOSSES[name](tt(s), tt(t), tt(MASK), temperature=0.0)
    with pytest.raises(ValueError, match="^teacher_logits: expected"):
        LOSSES[name](tt(s), tt(t[..., :4]), tt(MASK))
    with pytest.raises(ValueError, match="^teacher_logits: expected"):
        get_chunked(name)(factored(), teacher_2x9()[..., :4], MASK_2x9)


def test_registry_entries():
    for name in LOSSES:
        spec = get_spec(name)
        assert spec.kind == "output" and spec.reads_class_distribution and " -- " in spec.formula
        assert spec.inputs() == ["student_logits", "teacher_logits", "mask"]
        assert get_chunked(name) is not None
    assert set(get_spec("jsd").options()) == {"temperature", "beta"}
    assert get_spec("jsd").options()["beta"].default == 0.5
    assert "forward_kl" not in known_losses()  # forward KL is kd_kl, not registered twice
    ObjectiveConfig("jsd", params={"beta": 0.3, "temperature": 2.0}, temperature_schedule={"name": "linear"})


# ---- chunked twins: (2, 9) positions, 3 of them padding, float64 ----

H, V2 = 6, 31
MASK_2x9 = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])  # 15 real rows
CHUNKS = [1, 4, 5, 64]  # 5 divides the 15 real rows (and 18), 4 divides neither, 64 exceeds both


def factored(bias=True, chunk=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V2, H, generator=g, dtype=torch.float64)
    b = torch.randn(V2, generator=g, dtype=torch.float64) if bias else None
    leaves = [None if x is None else x.to(dtype).requires_grad_(True) for x in (hidden, weight, b)]
    return FactoredLogits(*leaves, chunk)


def teacher_2x9(dtype=torch.float64):
    t = torch.randn(2, 9, V2, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 2
    t[1, 6:] = float("nan")  # padding: never read
    return t.to(dtype)


def params(logits):
    return [x for x in (logits.hidden, logits.weight, logits.bias) if x is not None]


TWIN_CASES = {"reverse_kl_T1": ("reverse_kl", {}), "reverse_kl_T3": ("reverse_kl", {"temperature": 3.0}),
              "tvd_T1": ("tvd", {}), "tvd_T2": ("tvd", {"temperature": 2.0}),
              "jsd_T1": ("jsd", {}), "jsd_b0.2_T2": ("jsd", {"beta": 0.2, "temperature": 2.0}),
              "jsd_b0": ("jsd", {"beta": 0.0}), "jsd_b1_T0.5": ("jsd", {"beta": 1.0, "temperature": 0.5})}


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_chunked_twin_equals_dense_loss_in_value_and_gradients(case, chunk, bias, masked):
    name, opts = TWIN_CASES[case]
    logits = factored(bias, chunk)
    teacher, mask = teacher_2x9(), MASK_2x9 if masked else None
    if not masked:
        teacher = torch.nan_to_num(teacher)
    term = get_chunked(name)(logits, teacher, mask, **opts)
    assert term.denom == (15 if masked else 18)
    got = fused_loss(logits, [term], [1.0])[0]
    want = get_loss(name)(logits.dense(), teacher, mask, **opts)
    assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, params(logits)), torch.autograd.grad(want, params(logits))):
        assert_close(g_got, g_want)
        assert g_want.abs().max() > 0


def test_twins_and_kd_kl_share_one_fused_pass():
    logits, teacher = factored(chunk=4), teacher_2x9()
    names = [("reverse_kl", {"temperature": 2.0}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("kd_kl", {})]
    weights = [0.5, 1.0, 2.0, 0.25]
    terms = [get_chunked(n)(logits, teacher, MASK_2x9, **o) for n, o in names]
    total, values = fused_loss(logits, terms, weights)
    dense = [get_loss(n)(logits.dense(), teacher, MASK_2x9, **o) for n, o in names]
    assert_close(values, torch.stack(dense).detach())
    want = sum(w * d for w, d in zip(weights, dense))
    assert_close(total, want)
    for a, b in zip(torch.autograd.grad(total, params(logits)), torch.autograd.grad(want, params(logits))):
        assert_close(a, b)


def test_objectives_route_factored_logits_to_the_twins():
    logits, teacher = factored(chunk=4), teacher_2x9()
    inputs = {"student_logits": logits, "teacher_logits": teacher, "mask": MASK_2x9}
    objective = ObjectiveConfig("jsd", weight=0.5, params={"beta": 0.3},
                                temperature_schedule={"name": "linear", "start": 0.5, "end": 1.0})
    assert chunk_term(objective, inputs, step=1, total_steps=2) is not None
    got = evaluate_objective(objective, inputs, step=1, total_steps=2)  # temperature 0.5 -> 1.0: 0.75 at step 1
    assert_close(got, 0.5 * jsd(logits.dense(), teacher, MASK_2x9, temperature=0.75, beta=0.3))


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_position_temperature_falls_back_to_the_dense_loss(name):
    logits, teacher = factored(), teacher_2x9()
    assert get_chunked(name)(logits, teacher, MASK_2x9, temperature=torch.full((2, 9), 2.0)) is None
    # the dense loss takes it (as kd_kl does), equal to the float temperature when constant
    dense = logits.dense().detach()
    assert_close(get_loss(name)(dense, teacher, MASK_2x9, temperature=torch.full((2, 9), 2.0, dtype=torch.float64)),
                 get_loss(name)(dense, teacher, MASK_2x9, temperature=2.0))


@pytest.mark.parametrize("name", list(LOSSES))
def test_teacher_gets_no_gradient_through_the_twin(name):
    logits, teacher = factored(), teacher_2x9().requires_grad_(True)
    fused_loss(logits, [get_chunked(name)(logits, teacher, MASK_2x9)], [1.0])[0].backward()
    assert teacher.grad is None and all(p.grad is not None for p in params(logits))


@pytest.mark.parametrize("case", ["reverse_kl_T3", "jsd_b0.2_T2", "tvd_T1"])
def test_bf16_projection_twin_matches_the_dense_loss_on_the_same_logits(case):
    """bf16 hidden / weight / bias (mixed precision): both paths compute the bf16 logits and the loss in fp32;
    the twin's weight gradient is accumulated in fp32, so gradients agree to a few bf16 ulps."""
    name, opts = TWIN_CASES[case]
    logits, teacher = factored(chunk=4, dtype=torch.bfloat16), teacher_2x9(torch.float32)
    got = fused_loss(logits, [get_chunked(name)(logits, teacher, MASK_2x9, **opts)], [1.0])[0]
    want = get_loss(name)(logits.dense(), teacher, MASK_2x9, **opts)
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, 1e-5)
    for a, b in zip(torch.autograd.grad(got, params(logits)), torch.autograd.grad(want, params(logits))):
        assert a.dtype == b.dtype == torch.bfloat16
        bound = 2 ** -8 * 8 * (b.float().abs().max().item() + 1e-30)
        assert (a.float() - b.float()).abs().max().item() <= bound
