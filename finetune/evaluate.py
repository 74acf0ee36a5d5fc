"""Scoring outside training: a given (already fine-tuned) teacher on each held-out fold, and the speed of
teacher and students measured side by side on the same held-out batches with the same threads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.models import load_tokenizer
from kdlib.runtime.speed import compare_speed
from kdlib.runtime.jsonl import json_document
from finetune.data import EncodedExamples
from finetune.folds import read_split
from finetune.layout import TEACHER, Layout
from finetune.models import load_classifier
from finetune.run import EVAL_FILE, EXPORT, write_predictions
from finetune.runs import completed, teacher_run


def evaluate_given_teacher(cfg, fold: int, labels: list[str], out: Path) -> None:
    """eval.json and predictions.jsonl of teacher.finetuned on this fold's held-out split (no training)."""
    run = teacher_run(cfg, fold, labels)  # the teacher arm's config, its init the given folder: nothing is trained
    if completed(run):
        return
    model = load_classifier(cfg.teacher.finetuned, labels, seed=0, new_head=False,
                            regression=cfg.task_type == "regression")
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(run, model, load_tokenizer(cfg.teacher.finetuned), out, torch.device("cpu"), {"steps": 0})


def speed_step(cfg, labels: list[str], folds: list[int], run_folders_of) -> None:
    """Time every exported model of a fold on the fold's held-out examples; record it in each eval.json."""
    e = cfg.evaluation
    for fold in folds:
        folders = [f for f in run_folders_of(fold) if (f / EVAL_FILE).is_file()]
        if not folders or all("speed" in json_document(f / EVAL_FILE) for f in folders):
            continue  # nothing to time, or timed already (a new run of the fold has no speed yet: all are retimed)
        exports = {str(f): (cfg.teacher.finetuned if f.name == TEACHER and cfg.teacher.finetuned else f / EXPORT)
                   for f in folders}
        tokenizer = load_tokenizer(str(next(iter(exports.values()))))
        regression = cfg.task_type == "regression"
        examples = EncodedExamples(read_split(Layout(cfg).split(fold, "test")), tokenizer, labels, cfg.max_length,
                                   regression)
        batches = [examples.batch(list(range(i, min(i + e.speed_batch, len(examples)))))
                   for i in range(0, len(examples), e.speed_batch)]
        batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
        models = {name: load_classifier(str(folder), labels, seed=0, new_head=False, regression=regression)
                  for name, folder in exports.items()}
        speeds = compare_speed(models, batches, e.speed_threads, repeats=e.speed_repeats)
        for folder in folders:
            record = json_document(folder / EVAL_FILE)
            record["speed"] = speeds[str(folder)]
            atomic_write_text(folder / EVAL_FILE, json.dumps(record, indent=1) + "\n")
        print(f"[finetune] fold {fold}: timed {len(models)} models on {len(examples)} held-out examples", flush=True)
