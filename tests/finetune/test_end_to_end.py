"""python -m finetune end to end on a tiny task: real folds, a real fine-tuned teacher (DeepSpeed ZeRO-0 on
CPU), real transfer sets from the Beam pipeline, real students; every claim checked on values."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score

from finetune.__main__ import main
from kdlib.cache import TransferSet
from tests.finetune_fixture import base_config, write_config

HARD_ONLY = [{"name": "hard_ce", "weight": 1.0}, {"name": "kd_kl", "weight": 0.0, "params": {"temperature": 2.0}}]


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def records(path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Two folds, no augmentation, KD objective with alpha = 1 (hard labels only), the int8 deploy step: the whole
    stage once."""
    root = tmp_path_factory.mktemp("finetune-plain")
    data = base_config(root, copies=0, objectives=HARD_ONLY)
    data["deploy"] = {"enabled": True, "threads": 1, "speed_length": 32, "speed_batches": [1, 8], "repeats": 1}
    path = write_config(data, root / "config.yaml")
    assert main(["--config", str(path)]) == 0
    return root / "run", path, data


@pytest.mark.slow
def test_alpha_one_reproduces_the_no_kd_run_exactly(plain):
    run, _, _ = plain
    for fold in (0, 1):
        kd, baseline = weights(run / f"fold-{fold}/seed-0/kd/export"), weights(run / f"fold-{fold}/seed-0/baseline/export")
        assert kd.keys() == baseline.keys()
        assert all(torch.equal(kd[k], baseline[k]) for k in kd)
        start = weights(run / f"fold-{fold}/teacher/export")  # the students did train: they left their init
        assert not torch.equal(kd["classifier.weight"], start["classifier.weight"])


@pytest.mark.slow
def test_held_out_metrics_equal_scikit_learn(plain):
    run, _, _ = plain
    evals = sorted(run.glob("fold-*/**/eval.json"))
    assert len(evals) == 8  # 2 folds x (teacher, kd, baseline, kd-int8)
    for path in evals:
        record = json.loads(path.read_text())
        rows = [json.loads(line) for line in (path.parent / "predictions.jsonl").read_text().splitlines()]
        y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
        assert p == [int(np.argmax(r["scores"])) for r in rows]
        assert abs(record["metrics"]["accuracy"] - accuracy_score(y, p)) < 1e-12
        assert abs(record["metrics"]["macro_f1"] - f1_score(y, p, average="macro", labels=[0, 1], zero_division=0)) < 1e-12
        assert record["examples"] == 20
        if record["arm"] == "kd-int8":  # timed in its deployment table instead (the other arms: the speed step)
            assert record["deployment"]["onnxruntime int8"]["throughput_seq_per_s"] > 0
        else:
            assert record["speed"]["sequences_per_s"] > 0


@pytest.mark.slow
def test_report_shows_the_numbers_of_the_eval_files(plain):
    run, _, _ = plain
    report = json.loads((run / "report/report.json").read_text())
    markdown = (run / "report/report.md").read_text()
    for arm in ("teacher", "kd", "baseline"):
        values = [json.loads((run / f"fold-{f}" / ("teacher" if arm == "teacher" else f"seed-0/{arm}") /
                              "eval.json").read_text())["metrics"]["accuracy"] for f in (0, 1)]
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        summary = report["arms"][arm]["metrics"]["accuracy"]
        assert abs(summary["mean"] - mean) < 1e-12 and abs(summary["std"] - std) < 1e-12
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {arm} |"))
        assert f"{mean:.4f} ± {std:.4f}" in row
    assert (run / "report/metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_teacher_stops_early_and_exports_its_best_weights(plain):
    run, _, data = plain
    teacher = run / "fold-0/teacher"
    evals = records(teacher / "metrics.jsonl", "eval")
    best, best_step, since, stopped_at = None, None, 0, None
    for r in evals:  # the rule, by hand: strictly better accuracy resets patience
        if best is None or r["accuracy"] > best:
            best, best_step, since = r["accuracy"], r["step"], 0
        else:
            since += 1
            if since >= data["teacher"]["patience"]:
                stopped_at = r["step"]
                break
    record = json.loads((teacher / "eval.json").read_text())
    assert record["validation"]["best_step"] == best_step
    assert record["steps"] == (stopped_at or data["teacher"]["steps"])
    assert abs(record["validation"]["accuracy"] - best) < 1e-12
    exported = weights(teacher / "export")
    assert not (teacher / "best").exists() and not (teacher / "checkpoints").exists()  # removed once evaluated
    from transformers import BertForSequenceClassification

    from finetune.data import EncodedExamples, predict
    from finetune.folds import read_split
    from kdlib.runtime.models import load_tokenizer
    from kdlib.tasks.metrics import classification_metrics

    model = BertForSequenceClassification.from_pretrained(teacher / "export")  # the best weights, by their metric:
    valid = EncodedExamples(read_split(run / "folds/fold-0/valid.jsonl"), load_tokenizer(str(teacher / "export")),
                            ["neg", "pos"], data["max_length"])
    logits = predict(model, valid, 8, torch.device("cpu"))
    assert classification_metrics(valid.labels, logits.argmax(-1), 2)["accuracy"] == best
    assert set(exported) >= {"classifier.weight", "bert.pooler.dense.weight"}


@pytest.mark.slow
def test_folds_partition_the_examples_and_augmentation_sees_only_training_rows(plain):
    run, _, _ = plain
    split = {f: {s: [json.loads(line) for line in (run / f"folds/fold-{f}/{s}.jsonl").read_text().splitlines()]
                 for s in ("train", "valid", "test")} for f in (0, 1)}
    tests = [{r["id"] for r in split[f]["test"]} for f in (0, 1)]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1]) == 40
    for f in (0, 1):
        ids = {s: {r["id"] for r in split[f][s]} for s in split[f]}
        assert not ids["train"] & ids["test"] and not ids["valid"] & ids["test"] and not ids["train"] & ids["valid"]
        assert {r["label"] for r in split[f]["test"]} == {"neg", "pos"}
        ts = TransferSet(run / f"fold-{f}/transfer_set")
        assert {ts.row(i)["source_id"] for i in range(len(ts))} == ids["train"]


@pytest.mark.slow
def test_a_rerun_skips_finished_work_and_a_changed_config_is_refused(plain, capsys):
    run, path, data = plain
    before = {p: p.stat().st_mtime_ns for p in run.glob("fold-*/**/eval.json")}
    assert main(["--config", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold-*/**/eval.json")} == before
    assert main(["--config", str(path), "--set", "distill.steps=25"]) == 2
    err = capsys.readouterr().err
    assert "finished kd run made under config hash" in err and "nothing was changed" in err
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold-*/**/eval.json")} == before


@pytest.mark.slow
def test_a_transfer_set_of_another_teacher_is_refused(plain, tmp_path, capsys):
    from tests.tiny_models import make_tiny_bert

    run, _, data = plain
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "fold-0/seed-0")  # (paths are part of a run's config hash: the copy's runs are new runs)
    other = make_tiny_bert(tmp_path / "other", task="sequence_classification", layers=4, hidden=32, heads=4, seed=7)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(other / name, copy / "fold-0/teacher/export" / name)
    path = write_config({**data, "output_dir": str(copy)}, tmp_path / "config.yaml")
    assert main(["distill", "--config", str(path), "--fold", "0", "--arm", "kd"]) == 2
    err = capsys.readouterr().err
    assert "the transfer set was made by teacher" in err
    assert not (copy / "fold-0/seed-0/kd/eval.json").exists()
    assert main(["distill", "--config", str(path), "--fold", "0", "--arm", "baseline"]) == 0  # the lock was released


@pytest.mark.parametrize("change, field, words", [
    ({"evaluation": {"folds": 21, "seeds": [0]}}, "evaluation.folds", "class 'neg' has only 20 examples"),
    ({"distill": {"method": "theseus", "theseus": {"successor_layers": 3}}}, "distill.theseus.successor_layers",
     "divisor of the teacher's 4 layers"),
    ({"labels": ["neg"]}, "labels", "not listed in ['neg']"),
    ({"distill": {"objectives": [{"name": "attention_mse"}], "layer_map": {"name": "skip"}}},
     "distill.objectives[0]", "online_teacher"),
])
def test_bad_configs_are_named_before_any_work(tmp_path, capsys, change, field, words):
    data = base_config(tmp_path)
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    path = write_config(data, tmp_path / "config.yaml")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"field '{field}'" in err and words in err and str(path) in err
    assert not (tmp_path / "run").exists()


def test_a_teacher_head_without_the_task_labels_is_refused(tmp_path, capsys):
    from tests.tiny_models import make_tiny_bert

    finetuned = make_tiny_bert(tmp_path / "clf", task="sequence_classification", layers=4, hidden=32, heads=4)
    data = base_config(tmp_path)
    data["teacher"] = {"finetuned": str(finetuned)}
    assert main(["--config", str(write_config(data, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "field 'teacher.finetuned'" in err and "missing ['neg', 'pos']" in err


def test_a_task_with_one_label_is_refused_before_any_work(tmp_path, capsys):
    data = base_config(tmp_path)
    lines = (tmp_path / "task.txt").read_text().splitlines()
    (tmp_path / "task.txt").write_text("\n".join(l for l in lines if l.startswith("__label__neg")) + "\n")
    assert main(["--config", str(write_config(data, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "field 'task'" in err and "at least two labels, found only ['neg']" in err
    assert not (tmp_path / "run").exists()


def test_a_student_with_another_tokenizer_is_refused(tmp_path, capsys):
    data = base_config(tmp_path)
    student = tmp_path / "student"
    shutil.copytree(tmp_path / "encoder", student)
    vocab = (student / "vocab.txt").read_text().splitlines()
    (student / "vocab.txt").write_text("\n".join(vocab[:-1] + ["zzzz"]) + "\n")
    data["student"] = {"path": str(student)}
    assert main(["--config", str(write_config(data, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "field 'student.path'" in err and "must share its tokenizer" in err


def test_folds_are_stratified_and_deterministic():
    from finetune.folds import make_folds
    from kdlib.text.readers import Example

    examples = [Example(id=f"e{i}", text="x", label="a" if i % 3 else "b") for i in range(30)]
    one, two = make_folds(examples, 5, 0.1, seed=3), make_folds(examples, 5, 0.1, seed=3)
    assert [[e.id for e in f.test] for f in one] == [[e.id for e in f.test] for f in two]
    for fold in one:
        assert sum(e.label == "b" for e in fold.test) == 2 and sum(e.label == "a" for e in fold.test) == 4
        assert len(fold.valid) == 2 and {e.label for e in fold.valid} == {"a", "b"}  # floor(16 x 0.1), floor(8 x 0.1) -> 1


@pytest.mark.slow
def test_an_already_fine_tuned_teacher_is_scored_without_training(plain, tmp_path):
    """teacher.finetuned: no teacher run; the given classifier is scored on each held-out fold (here the plain
    run's own fold-0 teacher, so its held-out metrics must come out the same)."""
    run, _, data = plain
    given = {**data, "output_dir": str(tmp_path / "run"), "teacher": {"finetuned": str(run / "fold-0/teacher/export")}}
    path = write_config(given, tmp_path / "config.yaml")
    assert main(["teacher", "--config", str(path), "--fold", "0"]) == 0
    mine = json.loads((tmp_path / "run/fold-0/teacher/eval.json").read_text())
    theirs = json.loads((run / "fold-0/teacher/eval.json").read_text())
    assert mine["metrics"] == theirs["metrics"] and mine["steps"] == 0
    assert not (tmp_path / "run/fold-0/teacher/checkpoints").exists()
    assert main(["teacher", "--config", str(path), "--fold", "0"]) == 0  # done: skipped


# ---------------------------------------------------------------- the deploy step (finetune.int8)

@pytest.mark.slow
def test_the_int8_arm_is_the_onnx_int8_model_on_the_held_out_fold(plain):
    from transformers import AutoTokenizer

    run, _, _ = plain
    for fold in (0, 1):
        folder = run / f"fold-{fold}/seed-0/kd-int8"
        record = json.loads((folder / "eval.json").read_text())
        tests = [json.loads(line) for line in (run / f"folds/fold-{fold}/test.jsonl").read_text().splitlines()]
        tokenizer = AutoTokenizer.from_pretrained(folder / "export", local_files_only=True)
        session = ort.InferenceSession(str(folder / "export/model.int8.onnx"), providers=["CPUExecutionProvider"])
        encoded = tokenizer([t["text"] for t in tests], padding=True, truncation=True, max_length=32,
                            return_tensors="np")
        logits = session.run(None, {"input_ids": encoded["input_ids"].astype(np.int64),
                                    "attention_mask": encoded["attention_mask"].astype(np.int64)})[0]
        labels = np.array([["neg", "pos"].index(t["label"]) for t in tests])
        accuracy = float((logits.argmax(-1) == labels).mean())
        assert abs(record["metrics"]["accuracy"] - accuracy) < 1e-12 and record["arm"] == "kd-int8"
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [t["id"] for t in tests]
        scores = np.array([r["scores"] for r in rows])
        assert np.abs(scores - logits).max() <= 1e-5 * max(1.0, float(np.abs(logits).max()))
        # int8 against the fp32 student's own held-out predictions
        fp32 = np.array([json.loads(line)["scores"] for line in
                         (run / f"fold-{fold}/seed-0/kd/predictions.jsonl").read_text().splitlines()])
        assert np.abs(fp32 - logits).max() <= 0.1 * max(1.0, float(np.abs(fp32).max()))
        kd = json.loads((run / f"fold-{fold}/seed-0/kd/eval.json").read_text())
        assert record["parameters"] == kd["parameters"] and record["source_config_hash"] == kd["config_hash"]
        deployment = record["deployment"]
        assert set(deployment) == {"transformers fp32", "torch dynamic int8", "onnxruntime fp32", "onnxruntime int8"}
        sizes = {k: v["size_bytes"] for k, v in deployment.items()}
        assert sizes["onnxruntime int8"] < sizes["onnxruntime fp32"]


@pytest.mark.slow
def test_the_report_shows_the_int8_arm_and_its_table(plain):
    run, _, _ = plain
    report = json.loads((run / "report/report.json").read_text())
    assert set(report["arms"]) == {"teacher", "kd", "baseline", "kd-int8"}
    values = [json.loads((run / f"fold-{f}/seed-0/kd-int8/eval.json").read_text())["metrics"]["accuracy"]
              for f in (0, 1)]
    assert abs(report["arms"]["kd-int8"]["metrics"]["accuracy"]["mean"] - np.mean(values)) < 1e-12
    text = (run / "report/report.md").read_text()
    assert "## Deployment: int8" in text and "onnxruntime int8" in text
    deploy = json.loads((run / "fold-0/seed-0/kd-int8/export/deploy.json").read_text())
    int8 = deploy["candidates"]["onnxruntime int8"]
    assert f"{int8['size_bytes'] / 1e6:.2f}" in text  # the table's size column, from deploy.json


@pytest.mark.slow
def test_a_rerun_skips_the_finished_artefacts(plain):
    run, path, _ = plain
    before = {p: p.stat().st_mtime_ns for p in run.glob("fold-*/seed-*/kd-int8/eval.json")}
    assert len(before) == 2 and main(["deploy", "--config", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold-*/seed-*/kd-int8/eval.json")} == before
