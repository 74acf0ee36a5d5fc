"""evaluation.mode split (issue 34): one fold from the task's hashed train/dev/test split, a stratified labelled
budget, transfer.unlabeled texts in the transfer set without labels, and the report's paired difference KD -
baseline with its standard error."""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest

from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.folds import UNLABELED_PREFIX, class_counts, make_split_fold, parts_of, read_examples
from finetune.report import aggregate, paired_difference
from kdlib.config import from_dict
from kdlib.tasks.readers import TaskConfig, read_task
from tests.finetune_fixture import FILLER, NEGATIVE, POSITIVE, base_config, write_config

FRACTIONS = {"train": 0.6, "dev": 0.2, "test": 0.2}


def write_tweets(path, n: int = 160, seed: int = 0):
    """A small tweet-like CSV (text, sentiment, confidence): every text distinct once normalised, a third of them
    neutral, with a retweet copy of a few (the copy must land in its source's part)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "neutral", "positive")[i % 3]
        pool = NEGATIVE if label == "negative" else POSITIVE if label == "positive" else FILLER
        words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(pool) for _ in range(2)] + [f"w{i}"]
        rng.shuffle(words)
        rows.append((" ".join(words), label, f"{rng.uniform(0.5, 1):.3f}"))
    rows += [(f"RT @someone: {text}", label, "") for text, label, _ in rows[:5]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "sentiment", "confidence"])
        writer.writerows(rows)
    return path


def task(path) -> dict:
    return {"kind": "csv", "path": str(path), "text_column": "text", "label_column": "sentiment",
            "confidence_column": "confidence", "normalise": "tweet", "dedupe": True, "split": None,
            "split_fractions": dict(FRACTIONS)}


def split_config(root, *, labelled=24, unlabeled=30, max_valid=None, copies=0, seeds=(0,), **distill) -> dict:
    data = base_config(root, copies=copies, **distill)
    path = root / "tweets.csv"
    if not path.is_file():
        write_tweets(path)
    data["task"] = task(path)
    data["evaluation"] = {"mode": "split", "labelled": labelled, "max_valid": max_valid, "seeds": list(seeds)}
    data["transfer"]["unlabeled"] = unlabeled
    return data


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def tweets(tmp_path):
    return write_tweets(tmp_path / "tweets.csv")


def test_split_fold_is_the_readers_split_with_a_stratified_seeded_budget(tweets):
    cfg = from_dict(TaskConfig, task(tweets))
    examples = read_examples(cfg)
    parts = {name: [ex.id for ex in members] for name, members in parts_of(examples).items()}
    assert parts == {name: [ex.id for ex in read_task(cfg) if ex.split == name] for name in ("train", "dev", "test")}
    fold, extra = make_split_fold(examples, 30, 10, 40, seed=3)
    assert [ex.id for ex in fold.test] == parts["test"]  # the test part exactly, in file order
    assert {ex.id for ex in fold.valid} <= set(parts["dev"]) and len(fold.valid) == 10
    assert {ex.id for ex in fold.train} <= set(parts["train"]) and len(fold.train) == 30
    # stratified: each class's share of the budget is its share of the train part, to within one example
    train_part = [ex for ex in examples if ex.split == "train"]
    whole, budget = class_counts(train_part), class_counts(fold.train)
    for label, count in whole.items():
        assert abs(budget[label] - 30 * count / len(train_part)) < 1
    again, extra_again = make_split_fold(read_examples(cfg), 30, 10, 40, seed=3)
    assert [ex.id for ex in again.train] == [ex.id for ex in fold.train]
    assert [ex.id for ex in extra_again] == [ex.id for ex in extra]
    other, _ = make_split_fold(examples, 30, 10, 40, seed=4)
    assert [ex.id for ex in other.train] != [ex.id for ex in fold.train]
    everything, _ = make_split_fold(examples, None, None, 0, seed=3)
    assert [ex.id for ex in everything.train] == parts["train"] and [ex.id for ex in everything.valid] == parts["dev"]


def test_unlabeled_texts_are_disjoint_seeded_and_nested(tweets):
    examples = read_examples(from_dict(TaskConfig, task(tweets)))
    fold, extra = make_split_fold(examples, 24, None, 40, seed=0)
    ids = {name: {ex.id for ex in fold.split(name)} for name in ("train", "valid", "test")}
    unlabeled = {ex.id for ex in extra}
    assert len(unlabeled) == 40 and all(ex.split == "train" for ex in extra)
    assert not unlabeled & ids["train"] and not unlabeled & ids["valid"] and not unlabeled & ids["test"]
    texts = {ex.text for ex in extra}
    assert not texts & {ex.text for name in ids for ex in fold.split(name)}
    fewer_fold, fewer = make_split_fold(examples, 24, None, 10, seed=0)
    assert {ex.id for ex in fewer} <= unlabeled  # more unlabeled texts extend the draw of fewer
    assert [ex.id for ex in fewer_fold.train] == [ex.id for ex in fold.train]  # and never move the budget
    with pytest.raises(ValueError, match="unlabeled"):
        make_split_fold(examples, 24, None, 10_000, seed=0)


def test_folds_step_writes_the_split_fold_and_unlabeled_jsonl(tmp_path):
    data = split_config(tmp_path, labelled=24, unlabeled=30, max_valid=12)
    path = write_config(data, tmp_path / "config.yaml")
    assert main(["folds", "--config", str(path)]) == 0
    folder = tmp_path / "run" / "folds" / "fold-0"
    assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl", "unlabeled.jsonl", "valid.jsonl"]
    written = {name: lines(folder / f"{name}.jsonl") for name in ("train", "valid", "test", "unlabeled")}
    examples = read_examples(from_dict(TaskConfig, data["task"]))
    fold, extra = make_split_fold(examples, 24, 12, 30, seed=0)
    for name in ("train", "valid", "test"):
        assert [r["id"] for r in written[name]] == [ex.id for ex in fold.split(name)]
        assert all(set(r) == {"id", "text", "text_b", "label"} for r in written[name])
    assert [r["id"] for r in written["unlabeled"]] == [ex.id for ex in extra]
    assert all(r["label"] is None for r in written["unlabeled"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["folds", "--config", str(path)]) == 0  # deterministic: a rerun writes the same bytes
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # the baseline's training data is the labelled part alone: no transfer set, the rows of train.jsonl
    from finetune.run import training_rows
    from finetune.runs import student_run
    from kdlib.runtime.models import load_tokenizer

    cfg = from_dict(FinetuneConfig, data)
    base = student_run(cfg, 0, 0, "baseline", json.loads((tmp_path / "run/folds/labels.json").read_text()))
    assert base.transfer_set is None and base.examples == str(folder / "train.jsonl")
    rows, keys, _ = training_rows(base, str(tmp_path / "encoder"), load_tokenizer(str(tmp_path / "encoder")))
    assert rows.ids == [r["id"] for r in written["train"]] and keys == {"labels"}
    assert not set(rows.ids) & {r["id"] for r in written["unlabeled"]}


@pytest.mark.parametrize("change, field", [
    (lambda d: d["task"].update(normalise=None, dedupe=False, confidence_column=None), "evaluation.mode"),
    (lambda d: d["task"].update(split="train"), "task.split"),
    (lambda d: d["evaluation"].update(folds=3), "evaluation.folds"),
    (lambda d: d["evaluation"].update(mode="folds", folds=2), "evaluation.labelled"),
    (lambda d: d.update(evaluation={"folds": 2}), "transfer.unlabeled"),
    (lambda d: d["evaluation"].update(labelled=0), "evaluation.labelled"),
    (lambda d: d["transfer"].update(unlabeled=-1), "transfer.unlabeled"),
    (lambda d: d["evaluation"].update(labelled=100_000), "evaluation.labelled"),
    (lambda d: d["evaluation"].update(labelled=2), "evaluation.labelled"),
    (lambda d: d["transfer"].update(unlabeled=100_000), "transfer.unlabeled"),
])
def test_split_mode_misconfigurations_are_named(tmp_path, capsys, change, field):
    data = split_config(tmp_path)
    change(data)
    path = write_config(data, tmp_path / "config.yaml")
    assert main(["--check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (tmp_path / "run").exists()


def test_a_valid_split_config_checks(tmp_path, capsys):
    path = write_config(split_config(tmp_path), tmp_path / "config.yaml")
    assert main(["--check", "--config", str(path)]) == 0
    assert "1 fold" in capsys.readouterr().out
    cfg = from_dict(FinetuneConfig, split_config(tmp_path))
    assert cfg.evaluation.folds == 1 and cfg.transfer.unlabeled == 30


def record(arm, fold, seed, accuracy, f1):
    return {"arm": arm, "fold": fold, "seed": seed, "task_type": "classification", "labels": ["a", "b"],
            "metrics": {"accuracy": accuracy, "macro_f1": f1}, "parameters": 10, "speed": None,
            "folder": f"{arm}-{fold}-{seed}", "layers_executed": None}


def test_paired_difference_equals_a_hand_computation():
    kd = {0: (0.80, 0.70), 1: (0.75, 0.72), 2: (0.90, 0.81)}
    base = {0: (0.70, 0.69), 1: (0.74, 0.60), 2: (0.82, 0.80)}
    records = ([record("kd", 0, s, *v) for s, v in kd.items()] + [record("baseline", 0, s, *v) for s, v in base.items()]
               + [record("teacher", 0, 0, 0.95, 0.9), record("kd", 0, 9, 0.5, 0.5)])  # seed 9 has no baseline pair
    result = paired_difference(records, ["accuracy", "macro_f1"])
    assert result["n"] == 3 and result["pairs"] == [{"fold": 0, "seed": s} for s in (0, 1, 2)]
    # by hand: accuracy differences 0.10, 0.01, 0.08: mean 0.19 / 3; deviations 0.03667, -0.05333, 0.01667
    d = [0.10, 0.01, 0.08]
    mean = 0.19 / 3
    std = math.sqrt(((0.10 - mean) ** 2 + (0.01 - mean) ** 2 + (0.08 - mean) ** 2) / 2)
    acc = result["metrics"]["accuracy"]
    assert acc["differences"] == pytest.approx(d)
    assert acc["mean"] == pytest.approx(mean) and acc["std"] == pytest.approx(std)
    assert acc["se"] == pytest.approx(std / math.sqrt(3))
    assert acc["std"] == pytest.approx(0.047258156, abs=1e-8) and acc["se"] == pytest.approx(0.027284509, abs=1e-8)
    f1 = result["metrics"]["macro_f1"]  # 0.01, 0.12, 0.01
    assert f1["mean"] == pytest.approx(0.14 / 3)
    assert f1["se"] == pytest.approx(np.std([0.01, 0.12, 0.01], ddof=1) / math.sqrt(3))
    assert aggregate(records)["paired_difference"] == result
    assert paired_difference([r for r in records if r["arm"] != "baseline"], ["accuracy"]) is None
    one = paired_difference(records[:1] + records[3:4], ["accuracy"])
    assert one["n"] == 1 and math.isnan(one["metrics"]["accuracy"]["se"])


@pytest.mark.slow
def test_split_mode_end_to_end_unlabeled_rows_have_no_hard_label_and_the_baseline_never_sees_them(tmp_path):
    """The whole stage on the tiny tweets: the transfer set holds the labelled rows, their augmented copies and the
    unlabeled texts (and theirs); the KD student's batches hide every unlabeled row's label; the baseline trains on
    the labelled part only; the report shows the paired difference over two seeds."""
    import torch

    from finetune.data import TaskRows
    from finetune.run import training_rows
    from finetune.runs import student_run
    from kdlib.cache import TransferSet
    from kdlib.cache.reader import IGNORE_INDEX
    from kdlib.runtime.models import load_tokenizer

    data = split_config(tmp_path, labelled=24, unlabeled=20, copies=1, seeds=(0, 1))
    path = write_config(data, tmp_path / "config.yaml")
    assert main(["--config", str(path)]) == 0
    run = tmp_path / "run"
    folder = run / "folds" / "fold-0"
    train = [r["id"] for r in lines(folder / "train.jsonl")]
    unlabeled = [r["id"] for r in lines(folder / "unlabeled.jsonl")]
    assert len(train) == 24 and len(unlabeled) == 20

    ts = TransferSet(run / "fold-0" / "transfer_set")
    rows = [ts.row(i) for i in range(len(ts))]
    sources = {r["source_id"] for r in rows}
    assert sources == set(train) | {UNLABELED_PREFIX + u for u in unlabeled}
    kinds = {(r["source_id"].startswith(UNLABELED_PREFIX), r["augmentation"] == "original") for r in rows}
    assert kinds == {(False, True), (False, False), (True, True), (True, False)}  # labelled, unlabeled, copies

    cfg = from_dict(FinetuneConfig, data)
    labels = json.loads((run / "folds" / "labels.json").read_text())
    kd = student_run(cfg, 0, 0, "kd", labels)
    tokenizer = load_tokenizer(kd.teacher)
    task_rows, _, _ = training_rows(kd, kd.teacher, tokenizer)
    assert isinstance(task_rows, TaskRows) and len(task_rows) == len(rows)
    batch = task_rows.batch(list(range(len(task_rows))))
    by_source = [rows[i]["source_id"] for i in task_rows.order]
    hidden = torch.tensor([s.startswith(UNLABELED_PREFIX) for s in by_source])
    assert (batch["labels"][hidden] == IGNORE_INDEX).all()  # no unlabeled row has a hard label
    original = torch.tensor([not s.startswith(UNLABELED_PREFIX) and rows[i]["augmentation"] == "original"
                             for s, i in zip(by_source, task_rows.order)])
    assert (batch["labels"][original] != IGNORE_INDEX).all() and int(original.sum()) == 24
    first = next(i for i, s in enumerate(by_source) if s.startswith(UNLABELED_PREFIX))  # labelled rows first
    assert all(s.startswith(UNLABELED_PREFIX) == (i >= first) for i, s in enumerate(by_source))

    base = student_run(cfg, 0, 0, "baseline", labels)
    assert base.transfer_set is None
    examples, keys, _ = training_rows(base, base.init, tokenizer)
    assert examples.ids == train and keys == {"labels"}  # the labelled part only, never an unlabeled text

    report = json.loads((run / "report" / "report.json").read_text())
    paired = report["paired_difference"]
    assert paired["n"] == 2 and paired["pairs"] == [{"fold": 0, "seed": 0}, {"fold": 0, "seed": 1}]
    evals = {(a, s): json.loads((run / "fold-0" / f"seed-{s}" / a / "eval.json").read_text())["metrics"]["accuracy"]
             for a in ("kd", "baseline") for s in (0, 1)}
    diffs = [evals["kd", s] - evals["baseline", s] for s in (0, 1)]
    assert paired["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(diffs))
    assert paired["metrics"]["accuracy"]["se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(2))
    assert "Paired difference: kd − baseline" in (run / "report" / "report.md").read_text()


class FakeSet:
    """Rows as a transfer set lists them (shuffled, as shards are), with a label on every row."""

    path = "fake"

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def row(self, index):
        return self.rows[index]

    def batch(self, indices, pad_id=0):
        import torch

        return {"labels": torch.tensor([self.rows[i]["label"] for i in indices]),
                "ids": [self.rows[i]["id"] for i in indices]}


@pytest.mark.parametrize("hard_labels", ["original", "all"])
def test_unlabeled_rows_never_show_a_label_and_come_after_the_labelled_ones(hard_labels):
    from finetune.data import TaskRows
    from kdlib.cache.reader import IGNORE_INDEX
    from kdlib.errors import CacheError

    rows = [{"id": f"{src}|{aug}", "source_id": src, "augmentation": aug, "label": 1}
            for src in ("unlabeled:u2", "b", "unlabeled:u1", "a") for aug in ("copy1", "original")]
    task_rows = TaskRows(FakeSet(rows), ["a", "b"], pad_id=0, hard_labels=hard_labels, unlabeled_order=["u1", "u2"])
    batch = task_rows.batch(list(range(len(task_rows))))
    assert batch["ids"] == ["a|original", "a|copy1", "b|original", "b|copy1", "unlabeled:u1|original",
                            "unlabeled:u1|copy1", "unlabeled:u2|original", "unlabeled:u2|copy1"]
    shown = [1, IGNORE_INDEX if hard_labels == "original" else 1] * 2 + [IGNORE_INDEX] * 4
    assert batch["labels"].tolist() == shown
    assert task_rows.unlabeled.tolist() == [False] * 4 + [True] * 4
    with pytest.raises(CacheError, match="unlabeled:u2"):  # a set with unlabeled rows this fold does not list
        TaskRows(FakeSet(rows), ["a", "b"], pad_id=0, unlabeled_order=["u1"])


def test_a_regression_budget_is_a_seeded_random_draw():
    from kdlib.tasks.readers import ScoredExample

    examples = [ScoredExample(id=f"r{i}", text=f"t{i}", label=str(i / 10), split=("train", "dev", "test")[i % 3])
                for i in range(60)]
    fold, extra = make_split_fold(examples, 7, 5, 6, seed=1, regression=True)
    assert len(fold.train) == 7 and len(fold.valid) == 5 and len(extra) == 6 and len(fold.test) == 20
    assert fold.train == make_split_fold(examples, 7, 5, 6, seed=1, regression=True)[0].train
    assert not {ex.id for ex in extra} & {ex.id for ex in fold.train}
