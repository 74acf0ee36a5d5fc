"""The deploy stage: check every input, export and measure (kdlib.deploy.deploy_model), write the report.

A re-run whose output_dir holds this stage's deployment of the same config, weights and eval file skips the
work and rewrites deploy.md / deploy.png from deploy.json (timings would only differ by machine noise); set
overwrite: true to measure again. One of another config or other weights is replaced only with overwrite:
true; a folder of other files is never touched. kdlib.deploy and deploy.report import torch and onnxruntime
(~1.5 s): they are imported in `run`, after every input is checked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from kdlib.config import config_hash, content_hash, to_dict
from kdlib.errors import ConfigError, KDError, ReaderError
from kdlib.runtime.fingerprints import file_digest, model_fingerprint
from kdlib.runtime.jsonl import json_objects
from kdlib.runtime.models import (HEADS, architectures_of, check_model_folder, head_of, load_tokenizer,
                                  resolve_model_path, task_of)
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp, save_resolved
from deploy.config import DeployConfig

STAGE = "deploy"
RUN_ONLY = ("output_dir", "progress_bar", "overwrite")  # fields that change where or how it shows, not what


@dataclass
class Inputs:
    """What check_inputs found: the model folder, its config, and the eval texts with label ids (or None)."""

    folder: Path
    model_config: dict
    texts: list[str]
    labels: Optional[list[int]]


def _eval_rows(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of the eval file, line by line; a line that is no JSON object is a ConfigError."""
    try:
        yield from json_objects(path)
    except ReaderError as err:  # "<path>: line <n>: ...", under the field's name
        raise ConfigError(f"{source}: field 'eval_data': {err}") from None


def read_eval_data(path: Path, label2id: Optional[dict], source: str) -> tuple[list[str], Optional[list[int]]]:
    """Texts and label ids of a jsonl file; a label is a name of the model's label2id or its id. Labels are
    used only when every line has one (and the model is a classifier)."""
    texts, labels = [], []
    field = f"{source}: field 'eval_data': {path}"
    for lineno, row in _eval_rows(path, source):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ConfigError(f"{field}: line {lineno}: expected an object with a non-empty \"text\"")
        if row.get("text_b") not in (None, ""):
            raise ConfigError(f"{field}: line {lineno}: has a text_b; sentence pairs need token_type_ids, "
                              "which the exported graph does not take (single texts only)")
        texts.append(row["text"])
        label = row.get("label")
        if label is None or label2id is None:
            labels.append(None)
        elif isinstance(label, str) and label in label2id:
            labels.append(int(label2id[label]))
        elif isinstance(label, int) and not isinstance(label, bool) and label in label2id.values():
            labels.append(label)
        else:
            raise ConfigError(f"{field}: line {lineno}: label {label!r} is not one of the model's labels "
                              f"({', '.join(map(str, label2id))})")
    if not texts:
        raise ConfigError(f"{field}: holds no texts")
    return texts, (labels if all(x is not None for x in labels) else None)


def check_architectures(folder: Path, model_config: dict, source: str) -> None:
    """A head the export does not know (multiple choice, token classification, question answering, ...) would
    be loaded as its bare encoder and exported without its head: refused, naming what deploy exports."""
    unknown = [name for name in architectures_of(model_config) if head_of(name) is None]
    if unknown:
        heads = ", ".join(suffix for suffix, _ in HEADS)
        raise ConfigError(f"{source}: field 'model': {folder / 'config.json'}: architectures "
                          f"{', '.join(map(str, unknown))} cannot be deployed (the head would be dropped); deploy "
                          f"exports a bare model (<name>Model) or a head ending in {heads}")


def check_inputs(cfg: DeployConfig, source: str = "<config>") -> Inputs:
    """The model folder and its tokenizer loadable and safe, the eval file readable with the model's labels, the lengths within
    the model's positions: checked before any work. Errors are ConfigErrors naming the field and file."""
    try:
        folder = resolve_model_path(cfg.model)
        model_config = check_model_folder(folder)
    except KDError as err:
        raise ConfigError(f"{source}: field 'model': {err}") from None
    check_architectures(folder, model_config, source)
    try:  # transformers (~1 s): an unreadable tokenizer is the model field's error, not one after the lock
        load_tokenizer(str(folder), model_config)
    except KDError as err:
        raise ConfigError(f"{source}: field 'model': {err}") from None
    eval_path = Path(cfg.eval_data).expanduser()
    if not eval_path.is_file():
        raise ConfigError(f"{source}: field 'eval_data': {eval_path}: file not found (expected a jsonl file with "
                          "one {\"text\": ..., \"label\": ...} per line)")
    limit = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    for name in ("max_length", "speed_length"):
        if isinstance(limit, int) and getattr(cfg, name) > limit:
            raise ConfigError(f"{source}: field '{name}': expected at most {limit} (the model's "
                              f"max_position_embeddings), got {getattr(cfg, name)}")
    classifier = task_of(model_config) == "sequence_classification"
    label2id = None
    if classifier:  # transformers 5 leaves the default LABEL_<i> names out of config.json
        count = len(model_config.get("id2label") or {}) or int(model_config.get("num_labels") or 2)
        label2id = model_config.get("label2id") or {f"LABEL_{i}": i for i in range(count)}
    texts, labels = read_eval_data(eval_path, label2id, source)
    return Inputs(folder, model_config, texts, labels)


def claim_of(cfg: DeployConfig, inputs: Inputs) -> str:
    """What a deployment folder holds: the config (less where it was written) and the weights and eval file."""
    return config_hash({"config": content_hash(cfg, RUN_ONLY), "model": model_fingerprint(inputs.folder),
                        "eval_data": file_digest(Path(cfg.eval_data).expanduser())})


def _found(output_dir: Path) -> Optional[dict]:
    """The deploy.json of a deployment this stage wrote into output_dir, None when it holds none (or an unreadable one)."""
    try:
        found = read_stamp(output_dir, "deploy.json", STAGE)
    except ValueError:
        return None
    return found if found and "claim" in found else None


def run(cfg: DeployConfig, source: str = "<config>") -> Path:
    """The CLI: check inputs and output_dir, deploy and measure, write the report; returns deploy.md's path."""
    inputs = check_inputs(cfg, source)
    # torch and onnxruntime (~1.5 s to import): --help and input checks run without them (module docstring)
    from kdlib.deploy import deploy_model
    from deploy.report import write_report

    output_dir = Path(cfg.output_dir)
    claim = claim_of(cfg, inputs)
    found = _found(output_dir)
    state = check_output_folder(output_dir, stage=STAGE, found_claim=found["claim"] if found else None, claim=claim,
                                overwrite=cfg.overwrite,
                                difference="the config, the model's weights or the eval file differ")
    with output_lock(output_dir, STAGE):
        if state == "same" and not cfg.overwrite:
            print(f"[deploy] {output_dir} already holds this deployment (same config, weights and eval file); "
                  "not measured again (set overwrite: true to re-measure)", flush=True)
            record = found
        else:
            phases = 4 + len(set(cfg.speed_batches))
            with tqdm(total=phases, desc="deploy", unit="phase", file=sys.stderr,
                      disable=None if cfg.progress_bar else True) as bar:
                def progress(phase: str) -> None:
                    bar.set_postfix_str(phase)
                    bar.update(1)

                record = deploy_model(inputs.folder, output_dir, texts=inputs.texts, labels=inputs.labels,
                                      max_length=cfg.max_length, threads=cfg.threads, speed_length=cfg.speed_length,
                                      speed_batches=tuple(cfg.speed_batches), repeats=cfg.repeats,
                                      warmup=cfg.warmup, batch_size=cfg.batch_size, opset=cfg.opset,
                                      progress=progress, extra={"claim": claim, "config": to_dict(cfg),
                                                                "eval_data": str(cfg.eval_data)})
            save_resolved(cfg, output_dir)
        path = write_report(record, output_dir)
    print(path.read_text(encoding="utf-8").split("\n## ")[0], flush=True)
    print(f"[deploy] wrote {path}", flush=True)
    return path
