"""The finetune report against the numbers written into synthetic run folders, and the speed helpers.

The run folders are real files in the formats the finetune stage writes (eval.json, predictions.jsonl,
metrics.jsonl); their metrics are computed here with scikit-learn from the predictions, and every
number the report shows is checked against a numpy float64 computation from those files. Metrics are
in [0, 1] and means/stds are over 2-4 values, so float64 agrees to ~1e-16: abs 1e-14 is ample.
"""

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score
from transformers import BertForMaskedLM, BertForSequenceClassification

from finetune.report import aggregate, collect, write_report
from kdlib.errors import ReaderError
from kdlib.runtime.speed import compare_speed, count_parameters
from tests.tiny_models import make_tiny_bert

TOL = 1e-14
LABELS = ["negative", "neutral", "positive"]
N = 24  # held-out examples per fold
# arm: (probability a prediction is copied from the label, parameters, base sequences/s)
ARMS = {"teacher": (0.9, 1_000_000, 100.0), "kd": (0.75, 250_000, 350.0), "baseline": (0.6, 250_000, 362.5)}
PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(folder: Path, *, arm, fold, seed, ids, labels, predictions, parameters, speed, task_type, metrics,
               losses=None) -> dict:
    folder.mkdir(parents=True)
    eval_json = {"arm": arm, "fold": fold, "seed": seed, "task_type": task_type, "metrics": metrics,
                 "parameters": parameters,
                 "speed": {"sequences_per_s": speed, "batch_size": 8, "threads": 1, "seconds": N / (speed or 1)},
                 "labels": LABELS if task_type == "classification" else []}
    if speed is None:  # a run that was not timed
        del eval_json["speed"]
    (folder / "eval.json").write_text(json.dumps(eval_json))
    lines = [json.dumps({"id": i, "label": y, "prediction": p, "scores": [0.25, 0.5, 0.25]})
             for i, y, p in zip(ids, labels, predictions)]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    if losses is not None:
        log = [{"kind": "train", "step": s, "loss": loss, "kd_kl": loss / 2} for s, loss in enumerate(losses, 1)]
        log.append({"kind": "eval", "step": 2, "loss": 99.0})  # not a training line: not plotted
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return {**eval_json, "folder": folder, "ids": ids, "label_list": labels, "prediction_list": predictions}


def _classification_runs(root: Path) -> list[dict]:
    """2 folds x 2 seeds x 3 arms; students have a training log, the teacher does not."""
    rng = np.random.default_rng(1234)
    folds = {f: ([f"f{f}-ex{i}" for i in range(N)], rng.integers(0, 3, N)) for f in (0, 1)}
    runs = []
    for arm, (copy, parameters, base_speed) in ARMS.items():
        for fold, (ids, labels) in folds.items():
            for seed in (0, 1):
                predictions = np.where(rng.random(N) < copy, labels, rng.integers(0, 3, N))
                metrics = {"accuracy": float(accuracy_score(labels, predictions)),
                           "macro_f1": float(f1_score(labels, predictions, average="macro", labels=[0, 1, 2],
                                                      zero_division=0))}
                losses = None if arm == "teacher" else [2.0 / s + 0.1 * seed + 0.05 * fold for s in range(1, 6)]
                runs.append(_write_run(root / f"{arm}-f{fold}-s{seed}", arm=arm, fold=fold, seed=seed, ids=ids,
                                       labels=labels.tolist(), predictions=predictions.tolist(),
                                       parameters=parameters, speed=base_speed + 10.0 * fold + 2.5 * seed,
                                       task_type="classification", metrics=metrics, losses=losses))
    return runs


def _table(markdown: str, heading: str) -> list[dict]:
    """Rows of the first markdown table after `heading`, as {column: cell}."""
    lines = markdown.splitlines()
    start = lines.index(heading) + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, _, *body = rows
    return [dict(zip(header, row)) for row in body]


def _hand(runs, arm, metric, fold=None):
    values = np.array([r["metrics"][metric] for r in runs if r["arm"] == arm and fold in (None, r["fold"])])
    return values.sum() / values.size, math.sqrt(((values - values.mean()) ** 2).sum() / (values.size - 1))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        size = image.size
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == size and width > 100 and height > 100
    return size


@pytest.mark.slow
def test_report_numbers_are_the_runs_numbers(tmp_path):
    runs = _classification_runs(tmp_path / "runs")
    config = tmp_path / "kd_resolved.yaml"
    config.write_text("student:\n  layers: 2\nobjectives:\n  - name: kd_kl\n")
    out = write_report(tmp_path / "report", [r["folder"] for r in runs], title="SST-3 distillation",
                       configs={"kd": config})
    report_dir = tmp_path / "report"
    assert out == report_dir / "report.md"
    report = json.loads((report_dir / "report.json").read_text())
    markdown = out.read_text()
    assert markdown.startswith("# SST-3 distillation\n")
    assert report["metrics"] == ["accuracy", "macro_f1"] and list(report["arms"]) == ["teacher", "kd", "baseline"]

    summary = {row["arm"]: row for row in _table(markdown, "## Summary")}
    assert list(summary) == ["teacher", "kd", "baseline"]
    speed = {arm: np.array([r["speed"]["sequences_per_s"] for r in runs if r["arm"] == arm]) for arm in ARMS}
    for arm, (_, parameters, _) in ARMS.items():
        got = report["arms"][arm]
        assert got["n"] == 4 and got["folds"] == [0, 1] and got["seeds"] == [0, 1]
        assert got["parameters"] == parameters
        assert summary[arm]["parameters"] == f"{parameters:,}" and summary[arm]["runs"] == "4"
        for metric in ("accuracy", "macro_f1"):
            mean, std = _hand(runs, arm, metric)
            teacher_mean, _ = _hand(runs, "teacher", metric)
            assert got["metrics"][metric]["mean"] == pytest.approx(mean, abs=TOL)
            assert got["metrics"][metric]["std"] == pytest.approx(std, abs=TOL)
            assert got["metrics"][metric]["n"] == 4
            assert summary[arm][metric] == f"{mean:.4f} ± {std:.4f}"
            percent = 100.0 * mean / teacher_mean  # ratio of values near 0.6-0.9: relative 1e-13
            assert got["percent_of_teacher"][metric] == pytest.approx(percent, rel=1e-13)
            assert summary[arm][f"% of teacher ({metric})"] == f"{percent:.2f}%"
        assert report["arms"]["teacher"]["percent_of_teacher"]["accuracy"] == 100.0
        speed_mean = speed[arm].sum() / 4
        speedup = speed_mean / (speed["teacher"].sum() / 4)
        assert got["sequences_per_s"]["mean"] == pytest.approx(speed_mean, rel=1e-14)
        assert got["speedup_vs_teacher"] == pytest.approx(speedup, rel=1e-14)
        assert summary[arm]["sequences/s"] == f"{speed_mean:.1f}" and summary[arm]["speed-up"] == f"{speedup:.2f}×"
        assert got["speed_settings"] == [{"batch_size": 8, "threads": 1}]
    # by hand: kd (350 + 352.5 + 360 + 362.5) / 4 = 356.25, teacher (100 + 102.5 + 110 + 112.5) / 4 = 106.25
    assert report["arms"]["kd"]["speedup_vs_teacher"] == pytest.approx(356.25 / 106.25, rel=1e-14)
    assert summary["kd"]["speed-up"] == "3.35×" and summary["teacher"]["speed-up"] == "1.00×"

    per_fold = _table(markdown, "## Per fold (mean ± std over seeds)")
    assert [(row["fold"], row["arm"]) for row in per_fold] == [(str(f), a) for f in (0, 1) for a in ARMS]
    for row, entry in zip(per_fold, report["per_fold"]):
        assert row["seeds"] == "2" and entry["seeds"] == [0, 1]
        for metric in ("accuracy", "macro_f1"):
            mean, std = _hand(runs, row["arm"], metric, fold=int(row["fold"]))
            assert entry["metrics"][metric]["mean"] == pytest.approx(mean, abs=TOL)
            assert entry["metrics"][metric]["std"] == pytest.approx(std, abs=TOL)
            assert row[metric] == f"{mean:.4f} ± {std:.4f}"

    # figures: valid PNGs, linked from report.md; loss curves only for arms with a training log
    assert report["files"]["loss_curves"] == {"kd": "loss_kd.png", "baseline": "loss_baseline.png"}
    assert not (report_dir / "loss_teacher.png").exists()
    for name in ("metrics.png", "loss_kd.png", "loss_baseline.png"):
        _png_size(report_dir / name)
    assert "![metrics by arm](metrics.png)" in markdown
    assert "![kd: training loss](loss_kd.png)" in markdown and "![baseline: training loss](loss_baseline.png)" in markdown

    # predictions.csv: every run's every example, label/prediction as written, correct = label == prediction
    with open(report_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 * N
    assert list(rows[0]) == ["arm", "fold", "seed", "id", "label", "prediction", "correct"]
    by_key = {(r["arm"], int(r["fold"]), int(r["seed"]), r["id"]): r for r in rows}
    assert len(by_key) == 12 * N
    for run in runs:
        for i, y, p in zip(run["ids"], run["label_list"], run["prediction_list"]):
            row = by_key[(run["arm"], run["fold"], run["seed"], i)]
            assert (int(row["label"]), int(row["prediction"]), int(row["correct"])) == (y, p, int(y == p))
    kd_f0_s1 = [r for r in rows if (r["arm"], r["fold"], r["seed"]) == ("kd", "0", "1")]
    run = next(r for r in runs if (r["arm"], r["fold"], r["seed"]) == ("kd", 0, 1))
    assert np.mean([int(r["correct"]) for r in kd_f0_s1]) == pytest.approx(run["metrics"]["accuracy"], abs=TOL)

    # the config copy, byte for byte, and linked
    assert (report_dir / "configs" / "kd.yaml").read_bytes() == config.read_bytes()
    assert report["files"]["configs"] == {"kd": "configs/kd.yaml"} and "(configs/kd.yaml)" in markdown
    # per-run numbers in report.json are eval.json's, unrounded
    for entry, run in zip(report["runs"], runs):
        assert entry["metrics"] == run["metrics"] and entry["speed"] == run["speed"]


@pytest.mark.slow
def test_percent_and_speedup_are_undefined_when_not_like_for_like(tmp_path):
    runs = _classification_runs(tmp_path / "runs")
    chosen = [r for r in runs if r["arm"] != "teacher" or r["fold"] == 0]  # the teacher lacks fold 1
    records = collect([r["folder"] for r in chosen])
    result = aggregate(records)
    assert math.isnan(result["arms"]["kd"]["percent_of_teacher"]["accuracy"])
    assert result["arms"]["teacher"]["percent_of_teacher"]["accuracy"] == 100.0
    for record in records:  # measured with other settings than the teacher: no speed-up
        if record["arm"] == "baseline":
            record["speed"]["threads"] = 4
    result = aggregate(records)
    assert math.isnan(result["arms"]["baseline"]["speedup_vs_teacher"])
    assert result["arms"]["kd"]["speedup_vs_teacher"] == pytest.approx(356.25 / 101.25, rel=1e-14)
    # students on fold 0 only, the teacher on both: the reference is the teacher's fold-0 mean
    fold0 = collect([r["folder"] for r in runs if r["arm"] == "teacher" or r["fold"] == 0])
    kd_mean, _ = _hand(runs, "kd", "macro_f1", fold=0)
    teacher_fold0, _ = _hand(runs, "teacher", "macro_f1", fold=0)
    got = aggregate(fold0)["arms"]["kd"]
    assert got["teacher_mean_same_folds"]["macro_f1"] == pytest.approx(teacher_fold0, abs=TOL)
    assert got["percent_of_teacher"]["macro_f1"] == pytest.approx(100 * kd_mean / teacher_fold0, rel=1e-13)
    write_report(tmp_path / "report", [r["folder"] for r in chosen], title="partial")
    summary = {row["arm"]: row for row in _table((tmp_path / "report" / "report.md").read_text(), "## Summary")}
    assert summary["kd"]["% of teacher (accuracy)"] == "n/a"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["arms"]["kd"]["percent_of_teacher"]["accuracy"] is None


def test_regression_report_single_run_per_arm(tmp_path):
    rng = np.random.default_rng(5)
    ids = [f"pair{i}" for i in range(10)]
    targets = np.round(rng.uniform(0, 5, 10), 1)
    folders = []
    for arm, noise, speed in (("teacher", 0.3, 50.0), ("kd", 0.6, 200.0), ("baseline", 0.9, None)):
        predictions = np.round(targets + rng.normal(0, noise, 10), 3)
        metrics = {"pearson": float(scipy.stats.pearsonr(targets, predictions).statistic),
                   "spearman": float(scipy.stats.spearmanr(targets, predictions).statistic)}
        run = _write_run(tmp_path / arm, arm=arm, fold=0, seed=0, ids=ids, labels=targets.tolist(),
                         predictions=predictions.tolist(), parameters=10, speed=speed, task_type="regression",
                         metrics=metrics)
        folders.append(run)
    write_report(tmp_path / "report", [r["folder"] for r in folders], title="STS-B")
    markdown = (tmp_path / "report" / "report.md").read_text()
    summary = {row["arm"]: row for row in _table(markdown, "## Summary")}
    kd, teacher = folders[1]["metrics"], folders[0]["metrics"]
    assert summary["kd"]["spearman"] == f"{kd['spearman']:.4f} ± 0.0000"  # one run: std shown as 0
    assert summary["kd"]["% of teacher (pearson)"] == f"{100 * kd['pearson'] / teacher['pearson']:.2f}%"
    assert summary["kd"]["speed-up"] == "4.00×"
    assert summary["baseline"]["sequences/s"] == "n/a" and summary["baseline"]["speed-up"] == "n/a"
    assert "baseline (not timed)" in markdown
    with open(tmp_path / "report" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and {r["correct"] for r in rows} == {""}
    assert [float(r["prediction"]) for r in rows if r["arm"] == "kd"] == folders[1]["prediction_list"]
    assert "no loss curves" in markdown


def test_report_refuses_runs_that_do_not_agree(tmp_path):
    runs = _classification_runs(tmp_path / "runs")
    folders = [r["folder"] for r in runs]
    with pytest.raises(ReaderError, match="give each run folder once"):
        collect(folders + folders[:1])
    eval_path = runs[3]["folder"] / "eval.json"
    data = json.loads(eval_path.read_text())
    data["metrics"]["accuracy"] += 0.01
    eval_path.write_text(json.dumps(data))
    with pytest.raises(ReaderError, match=r"metrics.accuracy.*predictions.jsonl gives"):
        write_report(tmp_path / "report", folders, title="x")
    assert not (tmp_path / "report").exists()  # nothing is written before every input checks out
    data["metrics"]["accuracy"] -= 0.01
    eval_path.write_text(json.dumps(data))
    other = runs[6]["folder"] / "predictions.jsonl"  # an arm scored on another example of the fold
    other.write_text(other.read_text().replace('"f1-ex0"', '"f1-ex99"'))
    with pytest.raises(ReaderError, match="same held-out examples"):
        write_report(tmp_path / "report", folders, title="x")
    data["fold"] = "one"
    eval_path.write_text(json.dumps(data))
    with pytest.raises(ReaderError, match="field 'fold': expected an int, got 'one'"):
        collect(folders)


def _batches(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, vocab, (4, 16), generator=generator),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]


@pytest.mark.slow
def test_speed_helpers_on_tiny_berts(tmp_path):
    small = BertForSequenceClassification.from_pretrained(
        make_tiny_bert(tmp_path / "small", task="sequence_classification", layers=1))
    large = BertForSequenceClassification.from_pretrained(
        make_tiny_bert(tmp_path / "large", task="sequence_classification", layers=2))
    # BERT by hand (hidden h=32, intermediate 64, vocab V, 128 positions, 2 token types, 2 labels):
    h, i, V = 32, 64, small.config.vocab_size
    embeddings = V * h + 128 * h + 2 * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    head = (h * h + h) + (h * 2 + 2)  # pooler + classifier
    assert count_parameters(small) == embeddings + layer + head == sum(p.numel() for p in small.parameters())
    assert count_parameters(large) == embeddings + 2 * layer + head
    mlm = BertForMaskedLM.from_pretrained(make_tiny_bert(tmp_path / "mlm", layers=1))
    # the decoder weight is the input embedding (tied): counted once, unlike in the state dict
    assert count_parameters(mlm) == embeddings + layer + (h * h + h) + 2 * h + V

    batches = _batches(V)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        small.train()
        one = compare_speed({"model": small}, batches, threads=1, warmup=1, repeats=2)["model"]
        assert torch.get_num_threads() == 2 and small.training  # thread count and train mode restored
        assert set(one) == {"sequences_per_s", "seconds", "batch_size", "threads"}
        assert one["batch_size"] == 4 and one["threads"] == 1
        assert one["seconds"] > 0 and one["sequences_per_s"] == pytest.approx(8 / one["seconds"], rel=1e-12)
        both = compare_speed({"student": small, "teacher": large}, batches, threads=1, repeats=2)
        assert list(both) == ["student", "teacher"] and torch.get_num_threads() == 2
        for result in both.values():
            assert result["batch_size"] == 4 and result["threads"] == 1 and result["sequences_per_s"] > 0
            assert result["sequences_per_s"] * result["seconds"] == pytest.approx(8, rel=1e-12)
        with pytest.raises(ValueError, match="threads: expected an int >= 1, got 0"):
            compare_speed({"model": small}, batches, threads=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="batches: expected at least one batch"):
            compare_speed({"student": small}, [], threads=1)
    finally:
        torch.set_num_threads(before)
