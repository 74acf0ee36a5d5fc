"""Task metrics against scikit-learn and scipy on the same predictions; summaries against numpy by hand.

Every metric is a ratio or correlation in [-1, 1] computed in float64 from at most a few hundred terms,
so rounding differences between implementations are a few ulps of 1: an absolute 1e-12 is generous
and still far below any real disagreement (1/n >= 1e-3 for accuracy here).
"""

import math

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import accuracy_score, f1_score

from kdlib.tasks.metrics import (average_ranks, classification_metrics, percent_of, regression_metrics, summarize,
                                task_metrics)

TOL = 1e-12


@pytest.mark.parametrize("num_labels,n,seed", [(2, 50, 0), (3, 200, 1), (5, 300, 2), (7, 40, 3)])
def test_classification_matches_sklearn(num_labels, n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_labels, n))
    got = classification_metrics(labels.tolist(), predictions.tolist(), num_labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=TOL)
    expected = f1_score(labels, predictions, average="macro", labels=list(range(num_labels)), zero_division=0)
    assert got["macro_f1"] == pytest.approx(expected, abs=TOL)


def test_class_never_predicted_and_class_absent_from_labels():
    rng = np.random.default_rng(7)
    num_labels = 5
    labels = rng.integers(0, 4, 120)  # class 4 never occurs as a label
    predictions = rng.choice([0, 1, 3, 4], 120)  # class 2 is never predicted
    assert 4 not in labels and 2 not in predictions
    got = classification_metrics(labels, predictions, num_labels)
    expected = f1_score(labels, predictions, average="macro", labels=list(range(num_labels)), zero_division=0)
    assert got["macro_f1"] == pytest.approx(expected, abs=TOL)
    # by hand: per-class 2TP / (2TP + FP + FN), classes 2 and 4 have TP = 0 and score 0
    f1 = []
    for c in range(num_labels):
        tp = np.sum((labels == c) & (predictions == c))
        fp = np.sum((labels != c) & (predictions == c))
        fn = np.sum((labels == c) & (predictions != c))
        f1.append(0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    assert f1[2] == 0.0 and f1[4] == 0.0
    assert got["macro_f1"] == pytest.approx(np.mean(f1), abs=TOL)
    # a class absent from both labels and predictions still counts, as 0, in the macro average
    both_absent = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], 3)
    assert both_absent["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0.0) / 3, abs=TOL)
    assert both_absent["macro_f1"] == pytest.approx(
        f1_score([0, 1, 1, 0], [0, 1, 0, 0], average="macro", labels=[0, 1, 2], zero_division=0), abs=TOL)


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="labels: expected class ids in 0..1, got 2"):
        classification_metrics([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="predictions: expected 2 values"):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError, match="predictions: expected class ids in 0..2, got 0.5"):
        classification_metrics([0, 1], [0, 0.5], 3)
    with pytest.raises(ValueError, match="num_labels"):
        classification_metrics([0], [0], 0)
    with pytest.raises(ValueError, match="at least one example"):
        classification_metrics([], [], 2)


@pytest.mark.parametrize("seed,n", [(0, 30), (1, 257), (2, 1000)])
def test_regression_matches_scipy(seed, n):
    rng = np.random.default_rng(seed)
    targets = rng.normal(2.5, 1.2, n)
    predictions = 0.7 * targets + rng.normal(0.0, 0.8, n)
    got = regression_metrics(targets.tolist(), predictions.tolist())
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(targets, predictions).statistic, abs=TOL)
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(targets, predictions).statistic, abs=TOL)


def test_spearman_with_ties_uses_average_ranks():
    rng = np.random.default_rng(11)
    targets = rng.integers(0, 6, 200).astype(float) / 5.0  # STS-like scores: many ties
    predictions = np.round(targets + rng.normal(0.0, 0.3, 200), 1)  # ties on the prediction side too
    got = regression_metrics(targets, predictions)
    assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(targets, predictions).statistic, abs=TOL)
    assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(targets, predictions).statistic, abs=TOL)
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4.0, 1.0, 4.0, 2.0, 4.0])
    np.testing.assert_array_equal(average_ranks(targets), scipy.stats.rankdata(targets, method="average"))


def test_regression_constant_input_is_nan_and_perfect_is_one():
    constant = regression_metrics([0.1, 0.1, 0.1, 0.1], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])
    flat_prediction = regression_metrics([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert math.isnan(flat_prediction["pearson"]) and math.isnan(flat_prediction["spearman"])
    perfect = regression_metrics([1.0, 2.0, 4.0], [10.0, 20.0, 40.0])
    assert perfect == {"pearson": pytest.approx(1.0, abs=TOL), "spearman": pytest.approx(1.0, abs=TOL)}
    reversed_ = regression_metrics([1.0, 2.0, 4.0], [3.0, 2.0, 1.0])
    assert reversed_["spearman"] == pytest.approx(-1.0, abs=TOL)
    with pytest.raises(ValueError, match="at least 2 examples"):
        regression_metrics([1.0], [1.0])
    with pytest.raises(ValueError, match="predictions: expected finite numbers"):
        regression_metrics([1.0, 2.0], [1.0, float("nan")])


def test_task_metrics_dispatch():
    assert task_metrics("classification", [0, 1, 1], [0, 1, 0], 2) == classification_metrics([0, 1, 1], [0, 1, 0], 2)
    assert task_metrics("regression", [0.0, 1.0, 3.0], [0.5, 1.0, 2.0]) == regression_metrics(
        [0.0, 1.0, 3.0], [0.5, 1.0, 2.0])
    with pytest.raises(ValueError, match="task_type: expected one of classification, regression, got 'ranking'"):
        task_metrics("ranking", [0], [0], 1)
    with pytest.raises(ValueError, match="num_labels"):
        task_metrics("classification", [0], [0])


def test_summarize_against_numpy():
    values = [0.8125, 0.84375, 0.796875, 0.828125]
    array = np.asarray(values, dtype=np.float64)
    hand_mean = array.sum() / 4
    hand_std = math.sqrt(((array - hand_mean) ** 2).sum() / 3)  # sample std, ddof = 1
    got = summarize(values)
    assert got["n"] == 4
    # mean and std of values ~0.8 with spread ~0.02: float64 agrees to a few ulps of 1
    assert got["mean"] == pytest.approx(hand_mean, abs=1e-15)
    assert got["std"] == pytest.approx(hand_std, abs=1e-15)
    assert summarize([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    with_nan = summarize([0.5, float("nan")])
    assert math.isnan(with_nan["mean"]) and math.isnan(with_nan["std"]) and with_nan["n"] == 2
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])


def test_percent_of():
    assert percent_of(0.9, 0.9) == 100.0  # an arm against itself is exactly 100
    assert percent_of(0.81, 0.9) == pytest.approx(90.0, rel=1e-15)
    assert percent_of(0.3, 0.2) == pytest.approx(150.0, rel=1e-15)
    assert math.isnan(percent_of(0.5, 0.0))
    assert math.isnan(percent_of(float("nan"), 0.5))
    assert math.isnan(percent_of(0.5, float("nan")))
