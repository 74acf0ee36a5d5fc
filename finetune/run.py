"""One training run of the task stage on the shared training core: the teacher's fine-tuning, a distilled
student, or the no-KD baseline. Each is a `RunConfig` (the loop's config: what it hashes is what the run
computes) in its own folder with checkpoints, metrics, an exported Hugging Face folder, and the
held-out fold's predictions (`predictions.jsonl`, `eval.json`).

The loop, checkpoints, exact resume, preemption and the loss-input providers are kdlib/training's;
this file says what a task run is made of: a classifier, its batches, its validation metrics and its
export.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from transformers import AutoConfig

from kdlib.cache import TransferSet
from kdlib.training.deepspeed_engine import EngineConfig, deepspeed_config
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.io import atomic_directory, atomic_write_text
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.plots import loss_curve
from kdlib.students.layer_maps import LayerMapConfig
from kdlib.runtime.models import load_tokenizer, resolve_model_path
from kdlib.teachers.multi_teacher import MultiTeacherConfig, MultiTeacherSet
from kdlib.losses.objectives import ObjectiveConfig, validate_objectives
from kdlib.schemas import StudentConfig
from kdlib.tasks.metrics import task_metrics
from kdlib.students.theseus import TheseusConfig, TheseusModel
from kdlib.training import loop
from kdlib.training.batches import BatchStream
from kdlib.training.config import LoopConfig, math_hash
from kdlib.training.objective_plan import layer_offer, transfer_set_offer
from kdlib.training.providers import Offer
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule
from kdlib.training.sampler import DistributedBatchSampler
from finetune.data import EncodedExamples, TaskRows, predict
from finetune.folds import UNLABELED_FILE, read_split, read_unlabeled
from finetune.layout import TEACHER
from finetune.methods import Method, method_named
from finetune.models import load_classifier, save_classifier, student_from_teacher

STAGE = "python -m finetune"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"
EXPORT = "export"
PEER_EXPORT = "export-peer"


@dataclass
class RunConfig(LoopConfig):
    """One task run: which model starts, on which rows, with which objectives (written by the orchestrator)."""

    arm: Literal["teacher", "kd", "baseline"]  # what this run is in the comparison
    fold: int  # the held-out fold
    init: str  # the folder the model starts from (encoder, student, or the fine-tuned teacher for theseus/shape)
    examples: str  # the fold's train.jsonl: row order, and the rows themselves unless train_data is a transfer set
    valid_data: str  # the fold's valid.jsonl: validation metrics during training
    test_data: str  # the fold's test.jsonl: predictions after training (never read while training)
    labels: list[str]  # label names in index order
    max_length: int  # tokens per example
    objectives: list[ObjectiveConfig]  # weighted registered losses
    engine: EngineConfig  # batch and optimizer
    transfer_set: Optional[str] = None  # kd: the fold's task transfer set (teacher logits, augmented rows)
    teacher: Optional[str] = None  # kd: the fine-tuned teacher folder (fingerprints, online teacher)
    student_shape: Optional[StudentConfig] = None  # kd/baseline without a student folder: built from the teacher
    method: Literal["kd", "theseus"] = "kd"  # theseus: the model is a module-replacement model over the teacher
    theseus: Optional[TheseusConfig] = None  # method theseus
    layer_map: Optional[LayerMapConfig] = None  # intermediate losses: teacher layer -> student layer
    online_teacher: bool = False  # run the teacher on every batch
    hard_labels: Literal["original", "all"] = "original"  # which transfer-set rows the hard loss reads
    trust_remote_code: bool = False  # model folders' own code (off by default)
    task_type: Literal["classification", "regression"] = "classification"  # regression: one output, numeric targets
    tokenize_per_model: bool = False  # the transfer set's text is encoded by this model's own tokenizer
    name: Optional[str] = None  # the arm's name in eval.json and the report (default: arm), e.g. teacher-1
    more_teachers: list[str] = dataclasses.field(default_factory=list)  # multi-teacher KD: the other teachers' folders
    more_transfer_sets: list[str] = dataclasses.field(default_factory=list)  # ... and their transfer sets (same rows)
    multi_teacher: Optional[MultiTeacherConfig] = None  # how the teachers' logits combine

    def __post_init__(self) -> None:
        super().__post_init__()
        self.objectives = validate_objectives(self.objectives)

    @property
    def regression(self) -> bool:
        return self.task_type == "regression"


def method_of(cfg: RunConfig) -> Method:
    """The run's method (teacher runs and baselines keep the default, kd: they train a classifier as it is)."""
    return method_named(cfg.method)


def build_model(cfg: RunConfig, teacher_model=None):
    """The trained model of this run (seeded) and the folder whose tokenizer it uses."""
    build = method_of(cfg).build_over_teacher
    if cfg.arm != TEACHER and build is not None:
        return build(cfg, teacher_model), cfg.teacher
    if cfg.arm != TEACHER and cfg.student_shape is not None:
        return student_from_teacher(teacher_model, cfg.student_shape, cfg.labels, cfg.seed, cfg.regression), cfg.teacher
    return load_classifier(cfg.init, cfg.labels, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
                           regression=cfg.regression), cfg.init


def load_teacher(cfg: RunConfig):
    """The fine-tuned teacher, frozen (kd runs that need it: a shape student, theseus, an online teacher)."""
    model = load_classifier(cfg.teacher, cfg.labels, seed=0, trust_remote_code=cfg.trust_remote_code, new_head=False,
                            regression=cfg.regression)
    model.requires_grad_(False)
    return model.eval()


def needs_teacher_model(cfg: RunConfig) -> bool:
    return cfg.arm != TEACHER and (method_of(cfg).needs_teacher_model() or cfg.student_shape is not None
                                   or cfg.online_teacher)


def training_rows(cfg: RunConfig, tokenizer_folder: str, tokenizer):
    """kd: the transfer set in canonical order (fingerprints checked); else the fold's training examples."""
    order = read_split(Path(cfg.examples))
    if cfg.transfer_set is None:
        return EncodedExamples(order, tokenizer, cfg.labels, cfg.max_length, cfg.regression), {"labels"}, "mean"
    # the set was tokenized by the teacher's tokenizer; a student with its own encodes the kept text itself
    tokenizer_fp = tokenizer_fingerprint(resolve_model_path(cfg.teacher if cfg.tokenize_per_model else tokenizer_folder))
    retokenize = (tokenizer, cfg.max_length) if cfg.tokenize_per_model else None
    unlabeled_file = Path(cfg.examples).with_name(UNLABELED_FILE)  # mode split: the fold's unlabeled texts
    unlabeled = [uid for uid, _, _ in read_unlabeled(unlabeled_file)] if unlabeled_file.is_file() else None
    sets = [TransferSet(path, teacher_fingerprint=model_fingerprint(resolve_model_path(teacher)),
                        tokenizer_fingerprint=tokenizer_fp, verify="lazy")
            for path, teacher in zip([cfg.transfer_set] + cfg.more_transfer_sets, [cfg.teacher] + cfg.more_teachers)]
    first = sets[0]
    if len(sets) == 1:
        rows = TaskRows(first, [ex.id for ex in order], tokenizer.pad_token_id or 0, cfg.hard_labels,
                        retokenize=retokenize, unlabeled_order=unlabeled)
        keys, pooling = transfer_set_offer(first.manifest)
        return rows, set(keys), pooling
    combined = MultiTeacherSet(sets, cfg.multi_teacher)  # checks the sets hold the same rows
    rows = TaskRows(first, [ex.id for ex in order], tokenizer.pad_token_id or 0, cfg.hard_labels, batcher=combined.batch,
                    retokenize=retokenize, unlabeled_order=unlabeled)
    return rows, set(combined.batch_keys()), "mean"


def teacher_config_of(cfg: RunConfig, teacher_model):
    """The teacher's transformers config: the loaded teacher's, else read from its folder (None: no teacher)."""
    if teacher_model is not None:
        return teacher_model.config
    if cfg.teacher is None:
        return None
    return AutoConfig.from_pretrained(str(resolve_model_path(cfg.teacher)), local_files_only=True)


def make_offer(cfg: RunConfig, model, teacher_config, cached: set, pooling: str) -> Offer:
    """What this run's objectives can read (the validated plan's Offer, now with the built models' shapes)."""
    layers = layer_offer(cfg.layer_map, teacher_config.num_hidden_layers if teacher_config is not None else 0,
                         model.config.num_hidden_layers, student_heads=model.config.num_attention_heads,
                         teacher_heads=teacher_config.num_attention_heads if teacher_config is not None else 0)
    return Offer(online_teacher=cfg.online_teacher, cached=frozenset(cached), peer=method_of(cfg).peer,
                 token_level=False, pooling=pooling, **layers)


def scores_to_predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Class indices (argmax), or the one output of a regression head."""
    return logits[:, 0] if regression else logits.argmax(-1)


def validation_metrics(model, valid: EncodedExamples, batch_size: int, device, regression: bool = False) -> dict:
    """Held-out metrics plus the loss the hard objective minimises (cross-entropy, or squared error)."""
    logits = predict(model, valid, batch_size, device)
    labels = valid.labels
    predictions = scores_to_predictions(logits, regression)
    metrics = task_metrics("regression" if regression else "classification", labels, predictions, len(valid.label_names))
    if regression:
        return {**metrics, "loss": float(np.mean((predictions - labels.astype(np.float64)) ** 2))}
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return {**metrics, "loss": float(-log_probs[np.arange(len(labels)), labels].mean())}


def phase_curves(cfg: RunConfig, out: Path) -> Optional[Path]:
    """loss_phases.png for a run with phases: each objective drawn over the steps of its own phase only (outside
    it its weight is 0), so each phase's losses read on their own scale. None for a run without phases."""
    windows = {o.name: o.weight_schedule.milestones for o in cfg.objectives
               if o.weight_schedule is not None and o.weight_schedule.name == "window"}
    if not windows:
        return None
    records = []
    for r in read_metrics(out / "metrics.jsonl"):
        if r.get("kind") != "train":
            continue
        progress = (r["step"] - 1) / cfg.steps  # record n is the step computed at index n - 1
        records.append({"step": r["step"], **{k: r[k] for k, (lo, hi) in windows.items() if lo <= progress < hi}})
    return loss_curve(records, list(windows), out / "loss_phases.png", title="loss per phase")


def exported_model(module: DistillModule):
    """The plain model an export holds: Theseus' successor alone, else the student itself."""
    student = module.student
    return student.successor_model() if isinstance(student, TheseusModel) else student


def write_predictions(cfg: RunConfig, model, tokenizer, out: Path, device, extra: dict) -> dict:
    """predictions.jsonl and eval.json of `model` on the held-out fold (written last: a run is done when it exists)."""
    test = EncodedExamples(read_split(Path(cfg.test_data)), tokenizer, cfg.labels, cfg.max_length, cfg.regression)
    logits = predict(model, test, cfg.engine.micro_batch, device)
    predictions = scores_to_predictions(logits, cfg.regression)
    kind = float if cfg.regression else int
    lines = [json.dumps({"id": i, "label": kind(y), "prediction": kind(p), "scores": [float(v) for v in row]})
             for i, y, p, row in zip(test.ids, test.labels, predictions, logits)]
    atomic_write_text(out / PREDICTIONS_FILE, "\n".join(lines) + "\n")
    record = {"arm": cfg.name or cfg.arm, "fold": cfg.fold, "seed": cfg.seed, "task_type": cfg.task_type,
              "metrics": task_metrics(cfg.task_type, test.labels, predictions, len(cfg.labels)),
              "parameters": sum(p.numel() for p in model.parameters()), "labels": list(cfg.labels),
              "examples": len(test), "config_hash": math_hash(cfg), **extra}
    atomic_write_text(out / EVAL_FILE, json.dumps(record, indent=1) + "\n")
    return record


def train_run(cfg: RunConfig) -> int:
    """Train (or resume) one run, export it, predict the held-out fold; returns the loop's exit code."""
    return loop.run(cfg, STAGE, partial(build_job, cfg))


def build_job(cfg: RunConfig, session: loop.Session) -> loop.Job:
    """The run's module, batches, validation and export, handed to the loop."""
    rank0, device = session.place.rank == 0, session.device
    out = Path(cfg.output_dir)
    teacher_model = load_teacher(cfg) if needs_teacher_model(cfg) else None
    model, tokenizer_folder = build_model(cfg, teacher_model)
    tokenizer = load_tokenizer(str(tokenizer_folder))
    rows, cached, pooling = training_rows(cfg, str(tokenizer_folder), tokenizer)
    teacher_config = teacher_config_of(cfg, teacher_model)
    offer = make_offer(cfg, model, teacher_config, cached, pooling)
    peer = None
    if cfg.arm != TEACHER and method_of(cfg).peer:  # deep mutual learning: a second student, seed + 2
        def peer():
            return build_model(dataclasses.replace(cfg, seed=cfg.seed + 2), teacher_model)[0]
    module = DistillModule(model, cfg.objectives, offer, seed=cfg.seed, peer_factory=peer,
                           teacher_width=teacher_config.hidden_size if teacher_config is not None else
                           model.config.hidden_size,
                           emd_temperature=cfg.layer_map.emd_temperature if cfg.layer_map is not None else 1.0)
    online = None
    if cfg.online_teacher:
        hidden, qkv = module.teacher_needs()
        teacher_model.to(device)

        @torch.no_grad()
        def online(batch: dict):
            return run_model(teacher_model, batch["input_ids"], batch["attention_mask"], hidden=hidden, qkv=qkv,
                             heads=teacher_config.num_attention_heads)

    place = session.place
    sampler = DistributedBatchSampler(len(rows), micro_batch=cfg.engine.micro_batch,
                                      grad_accum=cfg.engine.accumulation(place.world_size), rank=place.rank,
                                      world_size=place.world_size, seed=cfg.seed)
    batches = BatchStream(sampler, rows.batch, depth=cfg.prefetch, pin_memory=device.type == "cuda")
    valid = EncodedExamples(read_split(Path(cfg.valid_data)), tokenizer, cfg.labels, cfg.max_length, cfg.regression)

    def evaluate(student) -> dict:
        view = student.successor_model() if isinstance(student, TheseusModel) else student
        return validation_metrics(view, valid, cfg.engine.micro_batch, device, cfg.regression)

    def finish(student, final_checkpoint, module_state, step: int, metrics: dict) -> str:
        if not rank0:
            return ""
        model_out = exported_model(module)
        with atomic_directory(out / EXPORT, replace=True) as tmp:
            save_classifier(model_out, tmp, resolve_model_path(str(tokenizer_folder)))
        if module.peer is not None:
            with atomic_directory(out / PEER_EXPORT, replace=True) as tmp:
                save_classifier(module.peer, tmp, resolve_model_path(str(tokenizer_folder)))
        record = write_predictions(cfg, model_out, tokenizer, out, device, {"steps": step, "validation": metrics})
        phase_curves(cfg, out)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
        return f"{cfg.arm} fold {cfg.fold} seed {cfg.seed}: held-out {shown}; exported to {out / EXPORT}"

    ds = deepspeed_config(cfg.engine, place.world_size, cfg.steps, source=str(out))
    return loop.Job(config=cfg, ds_config=ds, module=module, batches=batches, evaluate=evaluate, finish=finish,
                    teacher=online, name=f"{cfg.arm} f{cfg.fold} s{cfg.seed}")
