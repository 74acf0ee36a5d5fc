"""Task sampling: probabilities n_i ** alpha / sum equal a hand computation, draws are the documented inverse
CDF of Generator(PCG64(seed)).random(), frequencies are within 5 binomial standard deviations, and a
sampler restored from its JSON state continues the uninterrupted sequence (also while alpha anneals)."""

import json

import numpy as np
import pytest

from kdlib.tasks.sampling import TaskSampler, TaskSamplingConfig, task_probabilities

EPS = np.finfo(np.float64).eps
SIZES = [392702, 8551, 2490, 67349]  # MNLI, CoLA, RTE, SST-2 training rows


def hand_probabilities(sizes, alpha) -> np.ndarray:
    w = np.array([float(n) ** alpha for n in sizes])
    return w / w.sum()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0])
def test_probabilities_equal_the_hand_computation(alpha):
    p = task_probabilities(SIZES, alpha)
    assert p.dtype == np.float64 and abs(p.sum() - 1) <= 4 * EPS
    np.testing.assert_allclose(p, hand_probabilities(SIZES, alpha), rtol=16 * EPS, atol=0)
    if alpha == 0.0:
        np.testing.assert_allclose(p, np.full(4, 0.25), rtol=4 * EPS)
    if alpha == 1.0:
        np.testing.assert_allclose(p, np.array(SIZES) / sum(SIZES), rtol=16 * EPS)


def test_probabilities_of_huge_sizes_do_not_overflow():
    p = task_probabilities([10**300, 1], 1.0)  # exp(alpha (log n - max log n)): the tiny ratio survives
    assert np.isfinite(p).all() and p[0] == 1.0 and p[1] == pytest.approx(1e-300, rel=1e-12)
    p = task_probabilities([10**308, 10**308], 1.0)  # the plain sum n_0 + n_1 = 2e308 overflows float64
    np.testing.assert_allclose(p, [0.5, 0.5], rtol=4 * EPS)


def test_draws_are_the_inverse_cdf_of_the_seeded_generator():
    sampler = TaskSampler(SIZES, TaskSamplingConfig(alpha=0.5), seed=7)
    drawn = [sampler.next_task() for _ in range(2000)]
    u = np.random.Generator(np.random.PCG64(7)).random(2000)
    expected = np.searchsorted(np.cumsum(hand_probabilities(SIZES, 0.5)), u, side="right")
    assert drawn == expected.tolist()
    assert sampler.draws == 2000


def test_empirical_frequencies_are_within_five_binomial_standard_deviations():
    n = 100_000
    sampler = TaskSampler(SIZES, TaskSamplingConfig(alpha=0.5), seed=123)
    counts = np.bincount([sampler.next_task() for _ in range(n)], minlength=len(SIZES))
    p = hand_probabilities(SIZES, 0.5)
    sd = np.sqrt(n * p * (1 - p))  # count_i ~ Binomial(n, p_i)
    assert np.all(np.abs(counts - n * p) <= 5 * sd), (counts, n * p, sd)
    assert counts[2] > 0.04 * n  # sqrt sampling: RTE is drawn ~4.9% of the time, not 0.53% as by size


def test_annealed_alpha_moves_linearly_then_stays():
    cfg = TaskSamplingConfig(alpha=1.0, anneal_to=0.2, anneal_steps=10)  # Stickland & Murray: 1 -> 0.2
    assert [cfg.alpha_at(t) for t in (0, 5, 10, 50)] == pytest.approx([1.0, 0.6, 0.2, 0.2], abs=4 * EPS)
    sampler = TaskSampler(SIZES, cfg, seed=1)
    for t in range(12):
        np.testing.assert_allclose(sampler.probabilities(), hand_probabilities(SIZES, cfg.alpha_at(t)), rtol=16 * EPS)
        sampler.next_task()
    fixed = TaskSamplingConfig(alpha=0.3)
    assert fixed.alpha_at(0) == fixed.alpha_at(10**9) == 0.3


@pytest.mark.parametrize("cfg", [TaskSamplingConfig(alpha=0.5),
                                 TaskSamplingConfig(alpha=1.0, anneal_to=0.0, anneal_steps=700)])
def test_a_restored_sampler_continues_the_uninterrupted_sequence(cfg):
    whole = TaskSampler(SIZES, cfg, seed=5)
    reference = [whole.next_task() for _ in range(1000)]
    first = TaskSampler(SIZES, cfg, seed=5)
    head = [first.next_task() for _ in range(400)]
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's JSON side file holds
    resumed = TaskSampler(SIZES, cfg, seed=5)
    resumed.load_state_dict(saved)
    tail = [resumed.next_task() for _ in range(600)]
    assert head + tail == reference
    assert resumed.state_dict() == whole.state_dict()
    other = TaskSampler(SIZES, cfg, seed=6)
    assert [other.next_task() for _ in range(1000)] != reference


def test_a_state_of_another_seed_or_other_sizes_is_refused():
    state = TaskSampler(SIZES, seed=5).state_dict()
    with pytest.raises(ValueError, match=r"^seed: .*seed 5, this one 6"):
        TaskSampler(SIZES, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^sizes: "):
        TaskSampler(SIZES[:3], seed=5).load_state_dict(state)


@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"), ({"alpha": float("nan")}, "alpha"),
    ({"alpha": True}, "alpha"), ({"anneal_to": 2.0, "anneal_steps": 3}, "anneal_to"),
    ({"anneal_to": 0.2}, "anneal_steps"), ({"anneal_steps": 5}, "anneal_steps"),
    ({"anneal_to": 0.2, "anneal_steps": -1}, "anneal_steps"),
])
def test_invalid_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        TaskSamplingConfig(**kwargs)


def test_invalid_sizes_and_seed_are_refused():
    with pytest.raises(ValueError, match=r"^sizes: expected positive integers.*got 0 for task 1"):
        task_probabilities([3, 0], 0.5)
    with pytest.raises(ValueError, match=r"^sizes: expected at least one"):
        TaskSampler([])
    with pytest.raises(ValueError, match=r"^seed: "):
        TaskSampler([1, 2], seed=-1)
