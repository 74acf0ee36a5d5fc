"""Step 2: a fold's task transfer set, made by the data pipeline in its own process.

The stage writes the pipeline config (`fold-K/transfer_set.yaml`: the fold's training split, the fine-tuned
teacher, augmentation, dense logits plus the hidden states and pooled embeddings the objectives read; with
evaluation.mode split and transfer.unlabeled, the fold's unlabeled texts after its training examples)
and runs `python -m data_pipeline` on it, so the set is built, resumed and checked exactly as any
transfer set (a rerun with the same config leaves a complete set untouched).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from kdlib.config import to_dict
from kdlib.errors import KDError
from kdlib.runtime.io import atomic_write_text
from finetune.config import FinetuneConfig
from finetune.folds import (TRANSFER_INPUT_FILE, UNLABELED_FILE, read_split, read_unlabeled,
                            write_transfer_input)
from finetune.layout import Layout


def pipeline_config(cfg: FinetuneConfig, fold: int, labels: list[str], teacher: str, out: Path,
                    hidden_layers: list[int], pooled: Optional[str]) -> dict:
    """The data_pipeline config for this fold, as a plain dict (what transfer.yaml holds)."""
    lay = Layout(cfg)
    train = lay.split(fold, "train")
    examples = read_split(train)
    unlabeled = unlabeled_texts(cfg, fold)
    source = lay.fold_data(fold) / TRANSFER_INPUT_FILE if unlabeled else train
    task = {"kind": "jsonl", "path": str(source), "text_column": "text", "label_column": "label", "id_column": "id"}
    if any(ex.text_b for ex in examples) or any(text_b for _, _, text_b in unlabeled):
        task["text_b_column"] = "text_b"
    t = cfg.transfer
    config = {"teacher": {"path": teacher, "task": "sequence_classification",
                          "trust_remote_code": cfg.teacher.trust_remote_code},
              "output_dir": str(out), "task": task, "max_length": cfg.max_length,
              **({"task_type": "regression"} if cfg.task_type == "regression" else {"labels": list(labels)}),
              "augment": to_dict(t.augment),
              "teacher_outputs": {"dense_logits": True, "hidden_layers": sorted(set(hidden_layers) | set(t.hidden_layers)),
                                  "pooled": pooled, "top_k": 0},
              "batch_size": t.batch_size, "num_shards": t.num_shards, "torch_threads": t.torch_threads,
              "seed": cfg.evaluation.split_seed, "keep_text": t.tokenize_per_model}
    if t.augment_model is not None:
        config["augment_model"] = {"path": t.augment_model, "task": "masked_lm"}
    if cfg.architectures:
        config["architectures"] = to_dict(cfg.architectures)
    return config


def unlabeled_texts(cfg: FinetuneConfig, fold: int) -> list[tuple[str, str, Optional[str]]]:
    """The fold's unlabeled texts (evaluation.mode split with transfer.unlabeled > 0), else none."""
    path = Layout(cfg).fold_data(fold) / UNLABELED_FILE
    return read_unlabeled(path) if path.is_file() else []


def build_transfer_set(cfg: FinetuneConfig, fold: int, labels: list[str], teacher: str, out: Path,
                       needs: dict) -> None:
    """Write transfer.yaml and run the pipeline on it; its own errors are shown as it prints them. A fold with
    unlabeled texts hands the pipeline its training examples followed by those texts (TRANSFER_INPUT_FILE), so the
    teacher labels them softly; augmentation then makes copies of them as of every other example."""
    unlabeled = unlabeled_texts(cfg, fold)
    if unlabeled:
        lay = Layout(cfg)
        write_transfer_input(read_split(lay.split(fold, "train")), unlabeled,
                             "0" if cfg.task_type == "regression" else labels[0],
                             lay.fold_data(fold) / TRANSFER_INPUT_FILE)
    config = pipeline_config(cfg, fold, labels, teacher, out, needs.get("hidden_layers", []), needs.get("pooled"))
    path = out.parent / f"{out.name}.yaml"  # beside the set: fold-K/transfer_set.yaml (-1, -2, ... for more teachers)
    atomic_write_text(path, "# written by python -m finetune (step transfer)\n" + yaml.safe_dump(config, sort_keys=False))
    print(f"[finetune] fold {fold}: transfer set {out} (python -m data_pipeline --config {path})", flush=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    code = subprocess.call([sys.executable, "-m", "data_pipeline", "--config", str(path)], env=env)
    if code != 0:
        raise KDError(f"fold {fold}: python -m data_pipeline --config {path} failed with exit status {code} "
                      "(its message is above)")
