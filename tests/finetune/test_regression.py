"""Regression tasks end to end: numeric targets through folds, the transfer set and the students; Pearson and
Spearman equal scipy's; the hard_mse loss against a hand computation; class losses refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from finetune.__main__ import main
from finetune.data import TaskRows
from finetune.folds import read_split
from kdlib.cache import TransferSet
from kdlib.losses import get_loss
from tests.finetune_fixture import base_config, write_config, write_score_task


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-regression")
    data = base_config(root, copies=1)
    data["task"] = {"kind": "jsonl", "path": str(write_score_task(root / "scores.jsonl")), "label_column": "score"}
    data["task_type"] = "regression"
    data["distill"].pop("objectives")  # the regression default: logit_mse + hard_mse
    path = write_config(data, root / "config.yaml")
    assert main(["--config", str(path)]) == 0
    return root / "run", data


def test_hard_mse_is_the_mean_squared_error_over_rows_with_targets():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 1, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    y[[1, 4]] = float("nan")
    keep = [0, 2, 3, 5]
    want = float(np.mean([(float(z[i, 0]) - float(y[i])) ** 2 for i in keep]))
    assert abs(float(get_loss("hard_mse")(z, y)) - want) < 1e-12 * max(1.0, want)
    with pytest.raises(ValueError, match="hard_mse: expected student_logits"):
        get_loss("hard_mse")(torch.zeros(6, 2), y)


@pytest.mark.slow
def test_targets_travel_as_numbers(regression):
    run, _ = regression
    train = read_split(run / "folds/fold-0/train.jsonl")
    rows = TaskRows(TransferSet(run / "fold-0/transfer_set"), [ex.id for ex in train], pad_id=0)
    labels = rows.batch(list(range(len(rows))))["labels"]
    assert labels.dtype == torch.float32
    originals = [float(labels[i]) for i in range(len(rows)) if not rows.augmented[i]]
    assert np.allclose(originals, [float(ex.label) for ex in train], rtol=0, atol=1e-6)  # float32 of 3-decimal values
    assert all(math.isnan(float(labels[i])) for i in range(len(rows)) if rows.augmented[i])


@pytest.mark.slow
def test_pearson_and_spearman_equal_scipy(regression):
    run, _ = regression
    evals = sorted(run.glob("fold-*/**/eval.json"))
    assert len(evals) == 6
    for path in evals:
        record = json.loads(path.read_text())
        rows = [json.loads(line) for line in (path.parent / "predictions.jsonl").read_text().splitlines()]
        y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
        assert p == [r["scores"][0] for r in rows] and record["task_type"] == "regression"
        assert abs(record["metrics"]["pearson"] - pearsonr(y, p).statistic) < 1e-9
        assert abs(record["metrics"]["spearman"] - spearmanr(y, p).statistic) < 1e-9
    report = json.loads((run / "report/report.json").read_text())
    assert report["task_type"] == "regression" and set(report["metrics"]) == {"pearson", "spearman"}
    teacher_evals = [json.loads(line) for line in (run / "fold-0/teacher/metrics.jsonl").read_text().splitlines()
                     if '"eval"' in line]
    assert all("pearson" in r and "loss" in r for r in teacher_evals)  # it stops early on the validation squared error


def test_class_losses_are_refused_for_regression(tmp_path, capsys):
    data = base_config(tmp_path)
    data["task"] = {"kind": "jsonl", "path": str(write_score_task(tmp_path / "s.jsonl")), "label_column": "score"}
    data["task_type"] = "regression"
    data["distill"]["objectives"] = [{"name": "logit_mse"}, {"name": "kd_kl"}]
    assert main(["--config", str(write_config(data, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "field 'distill.objectives[1].name'" in err and "kd_kl compares class distributions" in err
