"""Batches for the task runs: labelled examples encoded in memory (teacher fine-tuning, the no-KD
baseline, evaluation) and task transfer-set rows in a canonical order (distillation).

Both sources put rows in the same order: the fold's training examples in file order, and in a
transfer set each example's original row before its augmented copies. So a transfer set without
augmentation hands the trainer exactly the batches the baseline gets, which is what makes "alpha = 1
reproduces the no-KD run" a testable statement. Padding is kdlib.text.padding's, for both.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kdlib.cache import TransferSet
from kdlib.cache.reader import IGNORE_INDEX
from kdlib.errors import CacheError
from kdlib.text.padding import pad_sequences
from kdlib.text.readers import Example
from kdlib.text.tokenize import tokenize_texts
from finetune.folds import UNLABELED_PREFIX

ORIGINAL = "original"


class EncodedExamples:
    """Examples tokenized once: `batch(indices)` -> input_ids, attention_mask, labels, ids."""

    def __init__(self, examples: list[Example], tokenizer, labels: list[str], max_length: int, regression: bool = False):
        """`labels`: the label names in index order; with `regression` the targets are the examples' numbers."""
        self.ids = [ex.id for ex in examples]
        pairs = [ex.text_b or "" for ex in examples] if any(ex.text_b for ex in examples) else None
        enc = tokenize_texts(tokenizer, [ex.text for ex in examples], pairs, task=True, max_length=max_length)
        self.input_ids = [np.asarray(ids, dtype=np.int32) for ids in enc["input_ids"]]
        self.label_names = list(labels)
        self.labels = (np.asarray([float(ex.label) for ex in examples], dtype=np.float32) if regression else
                       np.asarray([labels.index(ex.label) for ex in examples], dtype=np.int64))
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict:
        ids, mask = pad_sequences([self.input_ids[i] for i in indices], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(self.labels[list(indices)]),
                "ids": [self.ids[i] for i in indices]}


class TaskRows:
    """A task transfer set read in the canonical order; augmented rows' hard labels hidden unless asked for, unlabeled
    texts' always."""

    def __init__(self, transfer: TransferSet, example_order: list[str], pad_id: int, hard_labels: str = "original",
                 batcher=None, retokenize=None, unlabeled_order: Optional[list[str]] = None):
        """`batcher(indices, pad_id)` serves the batches (default: the set's own; multi-teacher KD: the combined
        sets' MultiTeacherSet.batch, over the same rows). `retokenize=(tokenizer, max_length)`: the rows' kept
        text is encoded by that (the student's own) tokenizer, once, and replaces the teacher's token ids.
        `unlabeled_order`: the ids of the fold's unlabeled texts (evaluation.mode split), whose rows (source id
        UNLABELED_PREFIX + id) come after every training example's and never show a label, like augmented copies
        but whatever `hard_labels` says."""
        self.transfer, self.pad_id = transfer, pad_id
        self.batcher = batcher or transfer.batch
        self.own_ids: dict[int, np.ndarray] = {}
        position = {eid: i for i, eid in enumerate(example_order)}
        first_unlabeled = len(position)
        position.update({UNLABELED_PREFIX + uid: first_unlabeled + i for i, uid in enumerate(unlabeled_order or [])})
        keys, augmented, unlabeled = [], [], []
        for index in range(len(transfer)):
            row = transfer.row(index)
            source = row["source_id"]
            if source not in position:
                raise CacheError(f"{transfer.path}: row {row['id']} comes from example {source!r}, which is not a "
                                 "training example of this fold (the transfer set belongs to another split)")
            is_original = row["augmentation"] == ORIGINAL
            keys.append((position[source], not is_original, row["id"], index))
            augmented.append(not is_original)
            unlabeled.append(position[source] >= first_unlabeled)
        keys.sort()
        self.order = [k[-1] for k in keys]
        if retokenize is not None:
            self._encode(*retokenize)
        self.augmented = np.asarray([augmented[i] for i in self.order], dtype=bool)
        self.unlabeled = np.asarray([unlabeled[i] for i in self.order], dtype=bool)
        self.hide_augmented_labels = hard_labels == "original"
        self.hidden = (self.augmented | self.unlabeled) if self.hide_augmented_labels else self.unlabeled

    def _encode(self, tokenizer, max_length: int) -> None:
        rows = [self.transfer.row(i) for i in range(len(self.transfer))]
        if "text" not in rows[0]:
            raise CacheError(f"{self.transfer.path}: the transfer set keeps no text (build it with keep_text: true, "
                             "i.e. transfer.tokenize_per_model: true), so another tokenizer cannot encode its rows")
        pairs = [r["text_b"] or "" for r in rows] if any(r["text_b"] for r in rows) else None
        enc = tokenize_texts(tokenizer, [r["text"] for r in rows], pairs, task=True, max_length=max_length)
        self.own_ids = {i: np.asarray(ids, dtype=np.int32) for i, ids in enumerate(enc["input_ids"])}

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, indices: list[int]) -> dict:
        batch = self.batcher([self.order[i] for i in indices], pad_id=self.pad_id)
        if self.own_ids:  # the student's own token ids for the same texts (teacher outputs are per sequence)
            batch["input_ids"], batch["attention_mask"] = pad_sequences([self.own_ids[self.order[i]] for i in indices],
                                                                        self.pad_id)
        if "labels" in batch and self.hidden.any():
            hide = torch.from_numpy(self.hidden[list(indices)])
            none = float("nan") if batch["labels"].is_floating_point() else IGNORE_INDEX  # regression: NaN, no target
            batch["labels"] = torch.where(hide, torch.full_like(batch["labels"], none), batch["labels"])
        return batch


@torch.no_grad()
def predict(model, source, batch_size: int, device) -> np.ndarray:
    """(N, C) float64 logits of `model` (eval mode) on every row of `source`, in order."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(source), batch_size):
        batch = source.batch(list(range(start, min(start + batch_size, len(source)))))
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out.append(logits.double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)
