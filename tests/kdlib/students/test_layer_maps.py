"""Layer maps (uniform, PKD skip/last, explicit) and BERT-EMD plan / weight update."""
import numpy as np
import pytest
import torch

from kdlib.students.layer_maps import (EmdLayerWeights, LayerMapConfig, explicit, last, pairwise_layer_cost, skip,
                              uniform)
from kdlib.losses import bert_emd, hidden_mse


def test_uniform_skip_last_values():
    assert uniform(12, 4) == [(3, 1), (6, 2), (9, 3), (12, 4)]
    assert uniform(12, 4, include_embeddings=True)[0] == (0, 0)
    assert uniform(6, 6) == [(i, i) for i in range(1, 7)]
    assert skip(12, 6) == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5)]  # PKD-Skip {2,4,6,8,10}
    assert last(12, 6) == [(7, 1), (8, 2), (9, 3), (10, 4), (11, 5)]  # PKD-Last {7..11}
    assert uniform(12, 5)[-1] == (12, 5)


@pytest.mark.parametrize("fn", [uniform, skip, last])
def test_student_deeper_than_teacher_rejected(fn):
    with pytest.raises(ValueError, match="deeper"):
        fn(4, 6)


def test_explicit_validation():
    assert explicit([(0, 0), [12, 6]], 12, 6) == [(0, 0), (12, 6)]
    for bad, msg in (([(13, 1)], "teacher layer 13"), ([(1, 7)], "student layer 7"), ([(-1, 0)], "teacher"),
                     ([(1, 1), (1, 1)], "duplicate"), ([(1.5, 1)], "integers"), ([], "at least one")):
        with pytest.raises(ValueError, match=msg):
            explicit(bad, 12, 6)


def test_layer_map_config():
    assert LayerMapConfig("skip").build(12, 6) == skip(12, 6)
    assert LayerMapConfig("explicit", pairs=[(2, 1)]).build(12, 6) == [(2, 1)]
    for kwargs in ({"name": "nope"}, {"name": "explicit"}, {"name": "uniform", "pairs": [(1, 1)]},
                   {"name": "emd", "emd_temperature": 0.0}):
        with pytest.raises(ValueError):
            LayerMapConfig(**kwargs)
    with pytest.raises(ValueError, match="teacher layer 13 out of range"):
        LayerMapConfig("explicit", pairs=[(13, 1)]).build(12, 6)


def test_emd_equal_costs_give_uniform_plan():
    w = EmdLayerWeights(6, 3)
    plan = w.plan(np.full((6, 3), 0.7))
    np.testing.assert_allclose(plan, np.full((6, 3), 1 / 18), rtol=1e-12)
    w.update(np.full((6, 3), 0.7), plan)  # equal costs keep uniform weights
    np.testing.assert_allclose(w.teacher_weights, np.full(6, 1 / 6))
    np.testing.assert_allclose(w.student_weights, np.full(3, 1 / 3))


def test_emd_zero_diagonal_gives_scaled_identity():
    n = 4
    cost = 1.0 + np.random.default_rng(0).random((n, n))
    np.fill_diagonal(cost, 0.0)
    plan = EmdLayerWeights(n, n).plan(torch.tensor(cost))
    np.testing.assert_allclose(plan, np.eye(n) / n, atol=1e-12)


def test_emd_plan_marginals_and_loss():
    rng = np.random.default_rng(1)
    cost = rng.random((6, 3))
    w = EmdLayerWeights(6, 3)
    plan = w.plan(cost)
    np.testing.assert_allclose(plan.sum(1), w.teacher_weights, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), w.student_weights, atol=1e-12)
    c = torch.tensor(cost, requires_grad=True)
    loss = bert_emd(c, plan)
    assert loss.item() == pytest.approx((plan * cost).sum(), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(c.grad.numpy(), plan)


def test_emd_weight_update_matches_paper_formula():
    rng = np.random.default_rng(2)
    cost = rng.random((5, 3)) + 0.1
    w = EmdLayerWeights(5, 3, temperature=0.5)
    plan = w.plan(cost)
    wt, ws = w.teacher_weights.copy(), w.student_weights.copy()
    w.update(cost, plan)

    def expected(transported, weights, tau):
        c = transported / weights
        new = c.sum() / c
        e = np.exp(new / tau - (new / tau).max())
        return e / e.sum()

    np.testing.assert_allclose(w.teacher_weights, expected((plan * cost).sum(1), wt, 0.5), rtol=1e-12)
    np.testing.assert_allclose(w.student_weights, expected((plan * cost).sum(0), ws, 0.5), rtol=1e-12)
    # a teacher layer that transports more cheaply gets more weight
    per_unit = (plan * cost).sum(1) / wt
    assert np.argmax(w.teacher_weights) == np.argmin(per_unit)
    assert w.teacher_weights.sum() == pytest.approx(1.0) and w.student_weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        w.plan(np.zeros((3, 5)))


def test_pairwise_layer_cost_with_hidden_mse():
    rng = np.random.default_rng(3)
    mask = torch.tensor([[1, 1, 0]])
    teacher = [torch.tensor(rng.normal(size=(1, 3, 4))) for _ in range(3)]
    student = [torch.tensor(rng.normal(size=(1, 3, 4))) for _ in range(2)]
    cost = pairwise_layer_cost(teacher, student, lambda s, t: hidden_mse(s, t, mask))
    assert tuple(cost.shape) == (3, 2)
    j, i = 2, 1
    expected = ((student[i].numpy() - teacher[j].numpy())[0, :2] ** 2).mean()
    assert cost[j, i].item() == pytest.approx(expected, rel=1e-12)
