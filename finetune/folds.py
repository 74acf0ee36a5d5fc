"""Stratified k-fold splits of a labelled set, written as plain JSON-lines files a person can read.

Each class's examples are shuffled by `Generator(split_seed)` and dealt round-robin to the folds, so
every fold holds each class in proportion. Fold f's test set is fold f; its training examples are
the other folds, from which a stratified `validation_fraction` is held out for the teacher's early
stopping. Augmentation (step 2) only ever sees a fold's training examples, so no augmented copy of a
test example can leak into training.

evaluation.mode split makes one fold (index 0) from the task's own hashed split instead (`make_split_fold`): test
is the `test` part as read, valid the `dev` part (or a stratified sample of `max_valid` of it), train a stratified,
seeded budget of `labelled` examples of the `train` part; `unlabeled` further train-part texts, disjoint from the
budget, are written beside them as unlabeled.jsonl (label null) for the transfer set alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.jsonl import json_objects
from kdlib.text.readers import Example, normalize_text
from kdlib.tasks.readers import read_task

SPLITS = ("train", "valid", "test")
UNLABELED_FILE = "unlabeled.jsonl"  # mode split: the fold's unlabeled texts (label null)
UNLABELED_PREFIX = "unlabeled:"  # a transfer-set row from an unlabeled text has source id UNLABELED_PREFIX + its id
TRANSFER_INPUT_FILE = "transfer_input.jsonl"  # train.jsonl + the unlabeled texts: what the pipeline reads


@dataclass
class Fold:
    """One fold's example lists, by split."""

    index: int
    train: list[Example]
    valid: list[Example]
    test: list[Example]

    def split(self, name: str) -> list[Example]:
        return getattr(self, name)


def read_examples(task_config) -> list[Example]:
    """All examples of the task, texts normalised as the pipeline normalises them; a whole-table read's examples
    keep their own class (ScoredExample: confidence and hashed `.split`)."""
    return [dataclasses.replace(ex, text=normalize_text(ex.text),
                                text_b=normalize_text(ex.text_b) if ex.text_b else None) for ex in read_task(task_config)]


def class_counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    return counts


def _stratified(examples: list[Example], parts: int, rng: np.random.Generator) -> list[list[Example]]:
    """Deal each class's shuffled examples round-robin into `parts` lists (class order: sorted labels)."""
    out: list[list[Example]] = [[] for _ in range(parts)]
    turn = 0
    for label in sorted(class_counts(examples)):
        members = [ex for ex in examples if ex.label == label]
        for i in rng.permutation(len(members)):
            out[turn % parts].append(members[i])
            turn += 1
    return out


def _by_value(examples: list[Example], parts: int, rng: np.random.Generator) -> list[list[Example]]:
    """Regression: examples sorted by target, cut into blocks of `parts`, each block's members dealt one per part in
    a shuffled order, so every fold spans the range of targets."""
    ordered = sorted(examples, key=lambda ex: (float(ex.label), ex.id))
    out: list[list[Example]] = [[] for _ in range(parts)]
    for start in range(0, len(ordered), parts):
        block = ordered[start:start + parts]
        for slot, i in zip(rng.permutation(parts), range(len(block))):
            out[slot].append(block[i])
    return out


def make_folds(examples: list[Example], folds: int, validation_fraction: float, seed: int,
               regression: bool = False) -> list[Fold]:
    """k stratified folds (by class, or by target for regression), each with a validation split of its training
    part (stratified by class; random for regression), deterministic."""
    rng = np.random.default_rng(seed)
    parts = _by_value(examples, folds, rng) if regression else _stratified(examples, folds, rng)
    result = []
    for f in range(folds):
        rest = [ex for g, part in enumerate(parts) if g != f for ex in part]
        order = {ex.id: i for i, ex in enumerate(examples)}
        rest.sort(key=lambda ex: order[ex.id])  # file order: the split does not depend on dealing order
        valid_ids = set()
        local = np.random.default_rng([seed, f])
        groups = {"all": len(rest)} if regression else class_counts(rest)
        for label, count in sorted(groups.items()):
            members = [ex.id for ex in rest if regression or ex.label == label]
            take = max(1, math.floor(count * validation_fraction)) if count > 1 else 0
            valid_ids.update(members[i] for i in local.permutation(len(members))[:take])
        test = sorted(parts[f], key=lambda ex: order[ex.id])
        result.append(Fold(f, [ex for ex in rest if ex.id not in valid_ids],
                           [ex for ex in rest if ex.id in valid_ids], test))
    return result


def parts_of(examples: list[Example]) -> dict[str, list[Example]]:
    """The examples by their hashed part (train, dev, test), file order kept; an example without one is refused."""
    parts: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for ex in examples:
        part = getattr(ex, "split", None)
        if part not in parts:
            raise ValueError(f"example {ex.id}: expected a hashed part (train, dev or test), got {part!r}; mode split "
                             "needs a task read whole with split: null")
        parts[part].append(ex)
    return parts


def _quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """`total` split over the classes in proportion to `counts` (largest remainder, ties to the sorted label), then
    at least one per class while `total` allows it (taken from the largest quota)."""
    labels = sorted(counts)
    n = sum(counts.values())
    if total >= n:
        return dict(counts)
    exact = {c: total * counts[c] / n for c in labels}
    quota = {c: math.floor(exact[c]) for c in labels}
    for c in sorted(labels, key=lambda c: (-(exact[c] - quota[c]), c))[:total - sum(quota.values())]:
        quota[c] += 1
    while total >= len(labels) and min(quota.values()) == 0:
        low = min(labels, key=lambda c: (quota[c], c))
        high = max(labels, key=lambda c: (quota[c], c))
        quota[low], quota[high] = quota[low] + 1, quota[high] - 1
    return quota


def stratified_sample(examples: list[Example], size: int | None, rng: np.random.Generator,
                      regression: bool = False) -> list[Example]:
    """`size` of `examples` (all when None or more), each class in proportion (regression: a plain random draw),
    drawn by `rng` per class in sorted label order; returned in file order."""
    if size is None or size >= len(examples):
        return list(examples)
    if regression:
        chosen = {examples[i].id for i in rng.permutation(len(examples))[:size]}
    else:
        chosen = set()
        for label, take in sorted(_quotas(class_counts(examples), size).items()):
            members = [ex.id for ex in examples if ex.label == label]
            chosen.update(members[i] for i in rng.permutation(len(members))[:take])
    return [ex for ex in examples if ex.id in chosen]


def make_split_fold(examples: list[Example], labelled: int | None, max_valid: int | None, unlabeled: int, seed: int,
                    regression: bool = False) -> tuple[Fold, list[Example]]:
    """Fold 0 of mode split and its unlabeled texts, a pure function of the examples and the seed: test = the test
    part, valid = the dev part (a stratified sample of `max_valid`), train = a stratified sample of `labelled` of
    the train part; unlabeled = `unlabeled` of the rest of the train part (a seeded draw, disjoint from train; a
    larger count extends a smaller one's draw). Each seed stream is its own, so changing one count moves nothing
    else."""
    parts = parts_of(examples)
    train = stratified_sample(parts["train"], labelled, np.random.default_rng([seed, 1]), regression)
    valid = stratified_sample(parts["dev"], max_valid, np.random.default_rng([seed, 2]), regression)
    taken = {ex.id for ex in train}
    rest = [ex for ex in parts["train"] if ex.id not in taken]
    if unlabeled > len(rest):
        raise ValueError(f"expected at most {len(rest)} unlabeled texts (the train part's {len(parts['train'])} "
                         f"less the labelled {len(train)}), got {unlabeled}")
    picked = set(rest[i].id for i in np.random.default_rng([seed, 3]).permutation(len(rest))[:unlabeled])
    extra = [ex for ex in rest if ex.id in picked]
    return Fold(0, train, valid, list(parts["test"])), extra


def example_record(ex: Example) -> dict:
    return {"id": ex.id, "text": ex.text, "text_b": ex.text_b, "label": ex.label}


def write_fold(fold: Fold, folder: Path) -> dict[str, Path]:
    """train/valid/test.jsonl (id, text, text_b, label) in `folder`; returns the paths by split."""
    paths = {}
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(example_record(ex), ensure_ascii=False) + "\n"
                                        for ex in fold.split(name)))
        paths[name] = path
    return paths


def write_unlabeled(examples: list[Example], folder: Path) -> Path:
    """unlabeled.jsonl (id, text, text_b, label null) in `folder`: the texts the transfer set adds without labels."""
    path = folder / UNLABELED_FILE
    atomic_write_text(path, "".join(json.dumps(dict(example_record(ex), label=None), ensure_ascii=False) + "\n"
                                    for ex in examples))
    return path


def read_unlabeled(path: Path) -> list[tuple[str, str, str | None]]:
    """(id, text, text_b) of an unlabeled.jsonl written by `write_unlabeled`."""
    return [(r["id"], r["text"], r.get("text_b")) for _, r in json_objects(path)]


def write_transfer_input(train: list[Example], unlabeled: list[tuple[str, str, str | None]], placeholder: str,
                         path: Path) -> Path:
    """The pipeline's input when a fold has unlabeled texts: the training examples as they are, then each unlabeled
    text with id UNLABELED_PREFIX + its id and `placeholder` as its label (the pipeline's task reader needs one;
    finetune.data.TaskRows hides the label of every such row, whatever distill.hard_labels says)."""
    records = [example_record(ex) for ex in train]
    records += [{"id": UNLABELED_PREFIX + uid, "text": text, "text_b": text_b, "label": placeholder}
                for uid, text, text_b in unlabeled]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def read_split(path: Path) -> list[Example]:
    """A split file written by `write_fold`."""
    return [Example(id=r["id"], text=r["text"], label=r["label"], text_b=r.get("text_b")) for _, r in json_objects(path)]
