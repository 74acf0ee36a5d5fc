"""The task-distillation methods on a real augmented transfer set: soft targets with BERT-PKD and RKD losses
(their cached inputs), TinyBERT's two phases, BERT-of-Theseus, deep mutual learning, and exact resume
after kill -9."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.__main__ import main
from finetune.config import DistillConfig, FinetuneConfig
from finetune.data import TaskRows
from finetune.folds import read_split
from finetune.methods import METHODS, method_named
from finetune.run import RunConfig, train_run
from finetune.runs import student_run
from kdlib.cache import TransferSet
from kdlib.cache.reader import IGNORE_INDEX
from kdlib.config import from_dict
from tests.finetune_fixture import base_config, kill_at_first_checkpoint, write_config

OBJECTIVES = [{"name": "kd_kl", "weight": 0.5, "params": {"temperature": 2.0}}, {"name": "hard_ce", "weight": 0.5},
              {"name": "pkd_patient", "weight": 0.1}, {"name": "rkd_distance", "weight": 0.1}]


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def records(path: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Fold 0 of two, x2 augmentation, KD + PKD (skip map) + RKD: teacher, transfer set and KD run."""
    root = tmp_path_factory.mktemp("finetune-augmented")
    data = base_config(root, copies=2, objectives=OBJECTIVES, layer_map={"name": "skip"})
    path = write_config(data, root / "config.yaml")
    assert main(["--config", str(path), "--fold", "0", "--arm", "kd"]) == 0
    return root / "run", data


def run_config(data: dict, out: Path, **distill):
    """The fold-0 KD run of `data` with other distillation settings, in folder `out`."""
    cfg = from_dict(FinetuneConfig, {**data, "distill": {**data["distill"], **distill}})
    return dataclasses.replace(student_run(cfg, 0, 0, "kd", ["neg", "pos"]), output_dir=str(out))


@pytest.mark.slow
def test_kd_loss_falls(augmented):
    run, _ = augmented
    kd = [r["kd_kl"] for r in records(run / "fold-0/seed-0/kd/metrics.jsonl")]
    assert len(kd) == 24 and np.mean(kd[-6:]) < 0.8 * np.mean(kd[:6])


@pytest.mark.slow
def test_the_transfer_set_caches_what_the_objectives_read(augmented):
    run, _ = augmented
    manifest = TransferSet(run / "fold-0/transfer_set").manifest
    assert manifest.cached["dense_logits"] and manifest.cached["pooled"] == "mean"  # rkd_distance: pooled teacher
    assert manifest.cached["hidden_layers"] == [2]  # pkd_patient over the skip map: teacher 2 -> student 1 (PKD
    #                                                  leaves the last layer to the output loss)


@pytest.mark.slow
def test_cached_logits_are_the_teachers_own(augmented):
    from transformers import BertForSequenceClassification

    run, _ = augmented
    teacher = BertForSequenceClassification.from_pretrained(run / "fold-0/teacher/export").eval()
    ts = TransferSet(run / "fold-0/transfer_set")
    for index in range(0, len(ts), 7):
        row = ts.row(index)
        ids = torch.from_numpy(np.asarray(row["input_ids"], dtype=np.int64))[None]
        with torch.no_grad():
            own = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double()
        cached = torch.from_numpy(np.asarray(row["logits"], dtype=np.float64))
        assert torch.allclose(cached, own, rtol=0, atol=1e-5 * max(1.0, float(own.abs().max())))  # fp32, batched


@pytest.mark.slow
def test_augmented_copies_carry_soft_targets_only(augmented):
    run, _ = augmented
    train = read_split(run / "folds/fold-0/train.jsonl")
    rows = TaskRows(TransferSet(run / "fold-0/transfer_set"), [ex.id for ex in train], pad_id=0)
    assert len(rows) == 3 * len(train) and int(rows.augmented.sum()) == 2 * len(train)
    batch = rows.batch(list(range(len(rows))))
    labels = batch["labels"].tolist()
    originals = [i for i in range(len(rows)) if not rows.augmented[i]]
    assert originals == [3 * k for k in range(len(train))]  # each example's original row first, its copies after
    assert [labels[i] for i in originals] == [["neg", "pos"].index(ex.label) for ex in train]
    assert all(labels[i] == IGNORE_INDEX for i in range(len(rows)) if rows.augmented[i])


@pytest.mark.slow
def test_two_phases_switch_objectives_at_the_configured_step(augmented, tmp_path):
    _, data = augmented
    phases = [{"name": "intermediate", "steps": 5, "objectives": [{"name": "hidden_mse"}]},
              {"name": "prediction", "steps": 7, "objectives": [{"name": "kd_kl", "params": {"temperature": 1.0}}]}]
    cfg = run_config(data, tmp_path / "phases", phases=phases, objectives=[])
    assert cfg.steps == 12 and train_run(cfg) == 0
    assert (tmp_path / "phases/loss_phases.png").read_bytes()[:4] == b"\x89PNG"
    log = records(tmp_path / "phases/metrics.jsonl")
    for r in log:  # record `step` n is the n-th optimizer step, computed at step index n - 1
        first = r["step"] <= 5
        assert (r["hidden_mse"] > 0) == first and (r["hidden_mse"] == 0.0) == (not first)
        assert (r["kd_kl"] == 0.0) == first and (r["kd_kl"] > 0) == (not first)


@pytest.mark.slow
def test_theseus_exports_the_successor_alone(augmented, tmp_path):
    from transformers import BertForSequenceClassification

    _, data = augmented
    cfg = run_config(data, tmp_path / "theseus", method="theseus", objectives=[{"name": "hard_ce"}],
                     theseus={"successor_layers": 2, "replacement_start": 0.5, "replacement_steps": 12})
    assert train_run(cfg) == 0
    model = BertForSequenceClassification.from_pretrained(tmp_path / "theseus/export").eval()
    assert model.config.num_hidden_layers == 2
    teacher = load_file(str(Path(cfg.teacher) / "model.safetensors"))
    exported = load_file(str(tmp_path / "theseus/export/model.safetensors"))
    assert torch.equal(exported["classifier.weight"], teacher["classifier.weight"])  # shared and frozen (the paper)
    assert not torch.equal(exported["bert.encoder.layer.0.attention.self.query.weight"],
                           teacher["bert.encoder.layer.0.attention.self.query.weight"])  # successor 0 trained
    rows = [json.loads(line) for line in (tmp_path / "theseus/predictions.jsonl").read_text().splitlines()]
    from finetune.data import EncodedExamples
    from kdlib.runtime.models import load_tokenizer

    test = EncodedExamples(read_split(Path(cfg.test_data)), load_tokenizer(str(tmp_path / "theseus/export")),
                           cfg.labels, cfg.max_length)
    batch = test.batch(list(range(len(test))))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    scores = torch.tensor([r["scores"] for r in rows], dtype=torch.float64)
    assert torch.allclose(scores, logits, rtol=0, atol=1e-5 * max(1.0, float(logits.abs().max())))


@pytest.mark.slow
def test_mutual_learning_saves_both_students(augmented, tmp_path):
    _, data = augmented
    cfg = run_config(data, tmp_path / "dml", objectives=[{"name": "dml"}])
    assert train_run(cfg) == 0
    a = load_file(str(tmp_path / "dml/export/model.safetensors"))
    b = load_file(str(tmp_path / "dml/export-peer/model.safetensors"))
    assert a.keys() == b.keys() and not torch.equal(a["classifier.weight"], b["classifier.weight"])


@pytest.mark.slow
def test_kill_9_and_resume_give_the_same_weights(augmented, tmp_path):
    import shutil

    run, data = augmented
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("seed-*"))
    long = {**data, "output_dir": str(copy), "distill": {**data["distill"], "steps": 120, "eval_every": 10}}
    path = write_config(long, tmp_path / "config.yaml")
    command = ["distill", "--config", str(path), "--fold", "0", "--arm", "kd"]
    assert main(command) == 0
    kd = copy / "fold-0/seed-0/kd"
    straight = load_file(str(kd / "export/model.safetensors"))
    shutil.rmtree(kd)
    assert not any(k in os.environ for k in RENDEZVOUS), "a finished run left its rendezvous in the environment"
    killed_at = kill_at_first_checkpoint(command, kd / "checkpoints", tmp_path / "killed.log", timeout=120)
    assert not (kd / "eval.json").exists(), "killed before the end"
    assert 0 < killed_at < 120
    assert main(command) == 0
    resumed = load_file(str(kd / "export/model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_multi_teacher_targets_are_the_weighted_average_of_the_teachers(tmp_path):
    """Two teachers per fold (seeds 0 and 1), each with its own transfer set of the same rows; the student's
    targets are their mixture at T = 2 with weights 1:3, computed by hand in float64."""
    data = base_config(tmp_path, copies=1, objectives=[{"name": "kd_kl", "params": {"temperature": 2.0}}])
    data["teacher"]["seeds"] = [0, 1]
    data["distill"]["multi_teacher"] = {"combine": "mean_probs", "weights": [1.0, 3.0], "temperature": 2.0}
    path = write_config(data, tmp_path / "config.yaml")
    assert main(["--config", str(path), "--fold", "0"]) == 0
    run = tmp_path / "run"
    cfg = from_dict(FinetuneConfig, data)
    kd = student_run(cfg, 0, 0, "kd", ["neg", "pos"])
    assert kd.more_transfer_sets == [str(run / "fold-0/transfer_set-1")]
    from finetune.run import training_rows
    from kdlib.runtime.models import load_tokenizer

    rows, cached, _ = training_rows(kd, kd.teacher, load_tokenizer(kd.teacher))
    assert {"labels", "teacher_logits"} <= cached and not any(k.startswith("teacher_hidden") for k in cached)
    batch = rows.batch(list(range(len(rows))))
    sets = [TransferSet(run / "fold-0/transfer_set"), TransferSet(run / "fold-0/transfer_set-1")]
    by_id = [{s.row(i)["id"]: np.asarray(s.row(i)["logits"], dtype=np.float64) for i in range(len(s))} for s in sets]
    for rid, combined in zip(batch["ids"], batch["teacher_logits"].double().numpy()):
        p = [np.exp(z / 2 - np.logaddexp.reduce(z / 2)) for z in (by_id[0][rid], by_id[1][rid])]
        mixture = 0.25 * p[0] + 0.75 * p[1]
        mine = np.exp(combined / 2 - np.logaddexp.reduce(combined / 2))
        assert np.abs(mine - mixture).max() < 1e-6  # float32 logits: ~1e-7 relative on probabilities <= 1
    assert not np.allclose(by_id[0][batch["ids"][0]], by_id[1][batch["ids"][0]])  # two different teachers
    report = json.loads((run / "report/report.json").read_text())
    assert {"teacher", "teacher-1", "kd", "baseline"} <= set(report["arms"])


@pytest.mark.slow
def test_a_student_with_its_own_tokenizer_reads_the_kept_text(augmented, tmp_path, capsys):
    """transfer.tokenize_per_model: the set keeps each row's text, the student's tokenizer encodes it; per-position
    objectives are refused (the two models' tokens differ)."""
    import shutil

    from kdlib.runtime.models import load_tokenizer
    from kdlib.text.tokenize import tokenize_texts

    _, data = augmented
    root = tmp_path
    student = root / "student"
    shutil.copytree(Path(data["teacher"]["init"]), student)
    vocab = (student / "vocab.txt").read_text().splitlines()
    (student / "vocab.txt").write_text("\n".join(v for v in vocab if v != "the") + "\n")  # "the" -> t ##h ##e
    (student / "tokenizer.json").unlink()
    own = {**data, "output_dir": str(root / "run"), "student": {"path": str(student)},
           "transfer": {**data["transfer"], "tokenize_per_model": True},
           "distill": {**data["distill"], "objectives": OBJECTIVES[:2], "layer_map": None}}
    path = write_config(own, root / "config.yaml")
    assert main(["--config", str(path), "--fold", "0", "--arm", "kd"]) == 0
    kd = student_run(from_dict(FinetuneConfig, own), 0, 0, "kd", ["neg", "pos"])
    from finetune.run import training_rows

    tokenizer = load_tokenizer(str(student))
    rows, _, _ = training_rows(kd, str(student), tokenizer)
    ts = TransferSet(root / "run/fold-0/transfer_set")
    batch = rows.batch([0, 1, 2])
    texts = [ts.row(rows.order[i])["text"] for i in range(3)]
    want = tokenize_texts(tokenizer, texts, None, task=True, max_length=own["max_length"])["input_ids"]
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == want[i]
        assert batch["input_ids"][i, :n].tolist() != list(ts.row(rows.order[i])["input_ids"])  # not the teacher's ids
    assert json.loads((root / "run/fold-0/seed-0/kd/eval.json").read_text())["examples"] == 20
    bad = {**own, "output_dir": str(root / "bad"),
           "distill": {**own["distill"], "objectives": [{"name": "pkd_patient"}], "layer_map": {"name": "skip"}}}
    assert main(["--config", str(write_config(bad, root / "bad.yaml")), "--check"]) == 2
    assert "with transfer.tokenize_per_model their tokens differ" in capsys.readouterr().err


@pytest.mark.slow
def test_a_decoder_student_with_its_own_tokenizer_gets_a_classifier_head(augmented, tmp_path):
    """A GPT-2 student (byte-level BPE, not the teacher's WordPiece) on the task set: transformers' own
    sequence-classification head over its last real token, fed the kept text in its own tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.run import training_rows
    from kdlib.runtime.models import load_tokenizer
    from kdlib.text.tokenize import tokenize_texts
    from tests.tiny_models import make_tiny_decoder

    _, data = augmented
    student = make_tiny_decoder(tmp_path / "gpt2", family="gpt2", layers=2, seed=3)
    own = {**data, "output_dir": str(tmp_path / "run"), "student": {"path": str(student)},
           "transfer": {**data["transfer"], "tokenize_per_model": True},
           "distill": {**data["distill"], "objectives": OBJECTIVES[:2], "layer_map": None}}
    assert main(["--config", str(write_config(own, tmp_path / "config.yaml")), "--fold", "0", "--arm", "kd"]) == 0
    kd = student_run(from_dict(FinetuneConfig, own), 0, 0, "kd", ["neg", "pos"])
    tokenizer = load_tokenizer(str(student))
    rows, _, _ = training_rows(kd, str(student), tokenizer)
    ts = TransferSet(tmp_path / "run/fold-0/transfer_set")
    batch = rows.batch([0, 1, 2])
    want = tokenize_texts(tokenizer, [ts.row(rows.order[i])["text"] for i in range(3)], None, task=True,
                          max_length=own["max_length"])["input_ids"]
    for i in range(3):
        assert batch["input_ids"][i, :int(batch["attention_mask"][i].sum())].tolist() == want[i]
    export = tmp_path / "run/fold-0/seed-0/kd/export"
    model = AutoModelForSequenceClassification.from_pretrained(str(export))
    assert type(model).__name__ == "GPT2ForSequenceClassification" and model.config.num_labels == 2
    assert len(AutoTokenizer.from_pretrained(str(export))) == len(tokenizer)  # its own tokenizer travels with it
    assert len(records(tmp_path / "run/fold-0/seed-0/kd/metrics.jsonl")) == 24
    assert json.loads((tmp_path / "run/fold-0/seed-0/kd/eval.json").read_text())["examples"] == 20


def test_the_method_table_names_every_method_a_config_may_choose():
    for cls in (DistillConfig, RunConfig):
        assert set(get_args(get_type_hints(cls)["method"])) == set(METHODS)
    assert not METHODS["theseus"].peer and METHODS["kd"].peer and METHODS["kd"].multitask
    with pytest.raises(ValueError, match=r"method: expected one of \['kd', 'theseus'\], got 'pkd'"):
        method_named("pkd")
