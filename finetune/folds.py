"""Stratified k-fold splits of a labelled set, written as plain JSON-lines files a person can read.

Each class's examples are shuffled by `Generator(split_seed)` and dealt round-robin to the folds, so
every fold holds each class in proportion. Fold f's test set is fold f; its training examples are
the other folds, from which a stratified `validation_fraction` is held out for the teacher's early
stopping. Augmentation (step 2) only ever sees a fold's training examples, so no augmented copy of a
test example can leak into training.
"""

from __future__ import annotations

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
    """All examples of the task, texts normalised as the pipeline normalises them."""
    return [Example(id=ex.id, text=normalize_text(ex.text), label=ex.label,
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


def read_split(path: Path) -> list[Example]:
    """A split file written by `write_fold`."""
    return [Example(id=r["id"], text=r["text"], label=r["label"], text_b=r.get("text_b")) for _, r in json_objects(path)]
