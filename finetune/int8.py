"""The deploy step: every KD student's export becomes an ONNX fp32 and an int8 artefact (kdlib.deploy), and the
int8 model is scored on the same held-out fold as every other arm, as the arm `kd-int8`:
`fold-K/seed-S/kd-int8/` holds `export/` (model.onnx, model.int8.onnx, config.json, tokenizer, deploy.json,
deploy.md), `predictions.jsonl` and `eval.json`, so the report's table shows it beside the fp32 student with a
mean ± std over folds and seeds, and the report adds the size / speed / quality table of the first fold's.

A finished artefact is skipped when its eval.json names the same KD run (config hash) and deploy settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np

from kdlib.config import config_hash
from kdlib.deploy import deploy_model, deployment_table
from kdlib.runtime.io import atomic_write_text
from kdlib.tasks.metrics import task_metrics
from kdlib.runtime.jsonl import json_document
from finetune.config import FinetuneConfig
from finetune.folds import read_split
from finetune.layout import KD, Layout
from finetune.run import EVAL_FILE, EXPORT, PREDICTIONS_FILE, scores_to_predictions

ARM = "kd-int8"
SOURCE_ARM = KD
CANDIDATE = "onnxruntime int8"  # the artefact whose predictions make the arm


def _settings_hash(cfg: FinetuneConfig, source: dict) -> str:
    return config_hash({"source": source["config_hash"], "deploy": dataclasses.asdict(cfg.deploy),
                        "max_length": cfg.max_length})


def done(out: Path, want: str) -> bool:
    path = out / EVAL_FILE
    return path.is_file() and json_document(path).get("config_hash") == want


def deploy_run(cfg: FinetuneConfig, labels: list[str], fold: int, seed: int) -> Optional[Path]:
    """The int8 arm of one KD run (None when that run has not finished); returns its folder."""
    lay = Layout(cfg)
    source_dir, out = lay.run(fold, SOURCE_ARM, seed), lay.run(fold, ARM, seed)
    if not (source_dir / EVAL_FILE).is_file():
        return None
    source = json_document(source_dir / EVAL_FILE)
    want = _settings_hash(cfg, source)
    if done(out, want):
        return out
    test = read_split(lay.split(fold, "test"))
    regression = cfg.task_type == "regression"
    targets = [float(ex.label) for ex in test] if regression else [labels.index(ex.label) for ex in test]
    d = cfg.deploy
    record = deploy_model(source_dir / EXPORT, out / EXPORT, texts=[ex.text for ex in test],
                          labels=None if regression else targets, max_length=cfg.max_length, threads=d.threads,
                          speed_length=d.speed_length, speed_batches=tuple(d.speed_batches), repeats=d.repeats,
                          extra={"fold": fold, "seed": seed, "source_run": str(source_dir)})
    atomic_write_text(out / EXPORT / "deploy.md", f"# int8 deployment: fold {fold}, seed {seed}\n\n"
                      + deployment_table(record) + "\n")
    logits = np.asarray(record["predictions"], dtype=np.float64)
    predictions = scores_to_predictions(logits, regression)
    kind = float if regression else int
    lines = [json.dumps({"id": ex.id, "label": kind(y), "prediction": kind(p), "scores": [float(v) for v in row]})
             for ex, y, p, row in zip(test, targets, predictions, logits)]
    atomic_write_text(out / PREDICTIONS_FILE, "\n".join(lines) + "\n")
    candidates = record["candidates"]
    summary = {"arm": ARM, "fold": fold, "seed": seed, "task_type": cfg.task_type,
               "metrics": task_metrics(cfg.task_type, np.asarray(targets), predictions, len(labels)),
               "parameters": source["parameters"], "labels": list(labels), "examples": len(test),
               "config_hash": want, "source_config_hash": source["config_hash"],
               "deployment": {name: {k: candidates[name][k] for k in ("size_bytes", "latency_s", "throughput_seq_per_s",
                                                                        "speedup", "max_abs_diff", "agreement")}
                              for name in candidates}}
    atomic_write_text(out / EVAL_FILE, json.dumps(summary, indent=1) + "\n")  # last: the arm is done
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    int8 = candidates[CANDIDATE]
    print(f"[finetune] {ARM} fold {fold} seed {seed}: held-out {shown}; {int8['size_bytes'] / 1e6:.1f} MB, "
          f"{int8['speedup']:.2f}x the fp32 student's throughput; {out / EXPORT}", flush=True)
    return out


def deploy_step(cfg: FinetuneConfig, labels: list[str], folds: list[int], seeds: list[int]) -> None:
    if cfg.deploy.enabled:
        for fold in folds:
            for seed in seeds:
                deploy_run(cfg, labels, fold, seed)


def int8_folders(cfg: FinetuneConfig) -> list[Path]:
    """Every finished kd-int8 folder, in fold and seed order (the report's extra runs)."""
    lay = Layout(cfg)
    return [lay.run(fold, ARM, seed) for fold in range(cfg.evaluation.folds) for seed in cfg.evaluation.seeds
            if (lay.run(fold, ARM, seed) / EVAL_FILE).is_file()] if cfg.deploy.enabled else []


def deployment_section(cfg: FinetuneConfig) -> str:
    """The report's int8 section: the first finished artefact's table, and where the others are."""
    folders = int8_folders(cfg)
    if not folders:
        return ""
    first = folders[0]
    record = json_document(first / EXPORT / "deploy.json")
    rel = Path("..") / first.relative_to(Path(cfg.output_dir)) / EXPORT
    return "\n".join([
        "## Deployment: int8 (ONNX Runtime dynamic quantization)", "",
        f"The arm {ARM} above is the KD student's int8 ONNX model scored on every held-out fold. The table is "
        f"{first.relative_to(Path(cfg.output_dir))}: sizes on disk, latency at batch {record['latency_batch']} and "
        f"throughput at batch {record['throughput_batch']} x {record['speed_length']} tokens, {record['threads']} "
        "thread(s) for every candidate, measured side by side in one process; agreement and accuracy on that "
        "fold's held-out examples; max |Δ| = the largest absolute logit difference from the transformers fp32 "
        "model.", "",
        deployment_table(record).rstrip("\n"), "",
        f"Artefacts: [{rel}]({rel}) (model.onnx, model.int8.onnx, deploy.json); every fold's in "
        f"fold-K/seed-S/{ARM}/export/.", ""])
