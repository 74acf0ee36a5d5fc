"""Schedules at start / middle / end, ScheduleConfig validation, BAM teacher annealing."""
import math

import numpy as np
import pytest
import torch

from kdlib.losses.schedules import (ScheduleConfig, get_schedule, known_schedules, teacher_annealing_lambda,
                             teacher_annealing_targets)


@pytest.mark.parametrize("name,start,mid,end", [
    ("constant", 2.0, 2.0, 2.0),
    ("linear", 4.0, 2.5, 1.0),
    ("cosine", 4.0, 2.5, 1.0),
])
def test_schedules_start_middle_end(name, start, mid, end):
    cfg = ScheduleConfig(name, start=4.0 if name != "constant" else 2.0, end=1.0)
    assert cfg.value(0, 100) == pytest.approx(start)
    assert cfg.value(50, 100) == pytest.approx(mid)
    assert cfg.value(100, 100) == pytest.approx(end)
    assert cfg.value(250, 100) == pytest.approx(end)  # clipped past the end


def test_cosine_quarter_point():
    cfg = ScheduleConfig("cosine", start=1.0, end=0.0)
    assert cfg.value(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_step_schedule():
    cfg = ScheduleConfig("step", start=1.0, milestones=[0.5, 0.75], gamma=0.1)
    assert cfg.value(0, 100) == pytest.approx(1.0)
    assert cfg.value(49, 100) == pytest.approx(1.0)
    assert cfg.value(50, 100) == pytest.approx(0.1)
    assert cfg.value(100, 100) == pytest.approx(0.01)
    assert cfg.range() == pytest.approx((0.01, 1.0))


def test_schedule_validation():
    assert known_schedules() == ["constant", "cosine", "linear", "step", "window"]
    with pytest.raises(ValueError, match="known schedules: constant, cosine, linear, step"):
        get_schedule("exp")
    with pytest.raises(ValueError, match="name"):
        ScheduleConfig("exp")
    with pytest.raises(ValueError, match="milestones"):
        ScheduleConfig("step", milestones=[0.8, 0.2])
    with pytest.raises(ValueError, match="gamma"):
        ScheduleConfig("step", gamma=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        ScheduleConfig("linear").value(1, 0)


def test_teacher_annealing_lambda_and_targets():
    assert [teacher_annealing_lambda(s, 10) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = np.array([2, -100])
    out = teacher_annealing_targets(torch.tensor(probs), torch.tensor(labels), 0.25).numpy()
    np.testing.assert_allclose(out[0], 0.25 * np.array([0, 0, 1]) + 0.75 * probs[0])
    np.testing.assert_allclose(out[1], probs[1])  # ignored label: pure teacher
    np.testing.assert_allclose(out.sum(-1), 1.0)
    with pytest.raises(ValueError):
        teacher_annealing_targets(torch.tensor(probs), torch.tensor(labels), 1.5)


def test_window_is_on_inside_its_steps_only():
    on = ScheduleConfig(name="window", start=1.0, end=0.0, milestones=[3 / 10, 7 / 10])
    assert [on.value(s, 10) for s in range(10)] == [0.0] * 3 + [1.0] * 4 + [0.0] * 3
    assert on.range() == (0.0, 1.0)
    for bad in ([0.5], [0.6, 0.4], [-0.1, 0.5], [0.2, 1.1]):
        with pytest.raises(ValueError, match="milestones: window"):
            ScheduleConfig(name="window", milestones=bad)
