"""Multi-task distillation: one student, a head per task, each step one task's batch (sampled by size ** alpha),
each task's soft targets from its own fine-tuned teacher (MT-DNN's ensemble-free distillation, BAM).

Every task runs the single-task steps in its own folder (`output_dir/<task>/`: folds, teacher, transfer set,
optionally its single-task student and baseline); fold K of the multi-task student trains on fold K's
training split of every task and is scored on each task's held-out fold K. Its run folder is
`output_dir/multitask/fold-K/seed-S/<arm>/`; each task's export, eval.json and predictions land in
`output_dir/<task>/fold-K/seed-S/multitask-<arm>/`, so each task's report shows it beside that task's teacher,
single-task student and baseline.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Optional

from kdlib.students.adashare import AdaShareConfig, TaskPolicies
from kdlib.training.deepspeed_engine import EngineConfig, deepspeed_config
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.runtime.io import atomic_directory
from kdlib.runtime.models import load_tokenizer, resolve_model_path
from kdlib.tasks.sampling import TaskSamplingConfig
from kdlib.training import loop
from kdlib.training.batches import BatchStream
from kdlib.training.config import LoopConfig, math_hash
from kdlib.training.module import DistillModule
from kdlib.runtime.jsonl import json_document
from finetune.adashare_policies import search_completed, write_policies
from finetune.config import FinetuneConfig
from finetune.data import EncodedExamples
from finetune.folds import read_split
from finetune.layout import Layout
from finetune.models import save_classifier
from finetune.multitask_model import MultiTaskClassifier, MultiTaskSampler
from finetune.run import (EVAL_FILE, EXPORT, STAGE, RunConfig, build_model, load_teacher, make_offer,
                          needs_teacher_model, teacher_config_of, training_rows, validation_metrics,
                          write_predictions)
from finetune.runs import loop_fields, student_run


@dataclasses.dataclass
class MultiTaskRunConfig(LoopConfig):
    """One multi-task run: the per-task views (each a RunConfig naming that task's rows, teacher and folders)."""

    arm: str  # kd or baseline; adashare-search or adashare for AdaShare's two runs (finetune.adashare)
    fold: int  # the held-out fold of every task
    task_names: list[str]  # the tasks, in order
    parts: list[RunConfig]  # one per task, in order: its data, teacher, transfer set, labels, and eval folder
    sampling: TaskSamplingConfig  # which task each step trains
    objectives: list[ObjectiveConfig]  # the objectives (the same for every task; also in each part)
    engine: EngineConfig  # the engine (also in each part)
    adashare: Optional[AdaShareConfig] = None  # AdaShare policy search: per-task layer policies learned with the weights
    policy: Optional[list[list[bool]]] = None  # AdaShare retraining: per task, the layers it executes (fixed)


def task_config(cfg: FinetuneConfig, index: int) -> FinetuneConfig:
    """Task `index` as a single-task config in output_dir/<name> (its own folds, teachers, transfer sets)."""
    t = cfg.tasks[index]
    single = dataclasses.replace(cfg.multitask, adashare=AdaShareConfig())  # AdaShare is the multi-task run's
    return dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir) / t.name), task=t.task, labels=list(t.labels),
                               tasks=[], multitask=single)


def multitask_run(cfg: FinetuneConfig, fold: int, seed: int, arm: str, labels: dict[str, list[str]]) -> MultiTaskRunConfig:
    parts = []
    for index, t in enumerate(cfg.tasks):
        single = student_run(task_config(cfg, index), fold, seed, arm, labels[t.name])
        out = Layout(task_config(cfg, index)).run(fold, f"multitask-{arm}", seed)
        parts.append(dataclasses.replace(single, output_dir=str(out), name=f"multitask-{arm}"))
    d = cfg.distill
    out = Layout(cfg).multitask(fold, seed, arm)
    return MultiTaskRunConfig(**loop_fields(cfg, out, d.steps, seed, d.eval_every), arm=arm, fold=fold,
                              task_names=[t.name for t in cfg.tasks], parts=parts,
                              sampling=cfg.multitask.sampling, objectives=parts[0].objectives, engine=d.engine)


def completed(run: MultiTaskRunConfig) -> bool:
    if run.adashare is not None:
        return search_completed(run)
    return all((Path(p.output_dir) / EVAL_FILE).is_file()
               and json_document(Path(p.output_dir) / EVAL_FILE).get("config_hash") == math_hash(run)
               for p in run.parts)


def build_job(cfg: MultiTaskRunConfig, session: loop.Session) -> loop.Job:
    rank0, device, place = session.place.rank == 0, session.device, session.place
    first = cfg.parts[0]
    teacher_model = load_teacher(first) if needs_teacher_model(first) else None
    base, tokenizer_folder = build_model(first, teacher_model)
    layers = base.config.num_hidden_layers
    policies = None if cfg.adashare is None and cfg.policy is None else \
        TaskPolicies(len(cfg.parts), layers, cfg=cfg.adashare, fixed=cfg.policy)
    student = MultiTaskClassifier(base, {n: len(p.labels) for n, p in zip(cfg.task_names, cfg.parts)}, seed=cfg.seed,
                                  policies=policies)
    tokenizer = load_tokenizer(str(tokenizer_folder))
    sources = [training_rows(p, str(tokenizer_folder), tokenizer) for p in cfg.parts]
    cached = set.intersection(*[set(c) for _, c, _ in sources])
    teacher_config = teacher_config_of(first, teacher_model)  # every task's teacher has the same shape (one config)
    offer = dataclasses.replace(make_offer(first, student, teacher_config, cached, sources[0][2]),
                                policies=cfg.adashare is not None)
    module = DistillModule(student, cfg.objectives, offer, seed=cfg.seed, teacher_width=teacher_config.hidden_size)
    rows = [r for r, _, _ in sources]
    sampler = MultiTaskSampler([len(r) for r in rows], cfg.sampling, micro_batch=cfg.engine.micro_batch,
                               grad_accum=cfg.engine.accumulation(place.world_size), rank=place.rank,
                               world_size=place.world_size, seed=cfg.seed)

    def load(pairs: list[tuple[int, int]]) -> dict:
        task = pairs[0][0]
        batch = rows[task].batch([i for _, i in pairs])
        batch["task"] = task
        return batch

    batches = BatchStream(sampler, load, depth=cfg.prefetch, pin_memory=device.type == "cuda")
    valid = [EncodedExamples(read_split(Path(p.valid_data)), tokenizer, p.labels, p.max_length, p.regression)
             for p in cfg.parts]

    def evaluate(model) -> dict:
        out = {}
        for t, name in enumerate(cfg.task_names):
            model.current = t
            for key, value in validation_metrics(model, valid[t], cfg.engine.micro_batch, device,
                                                 cfg.parts[t].regression).items():
                out[f"{name}/{key}"] = value
        out["accuracy"] = sum(out[f"{n}/accuracy"] for n in cfg.task_names) / len(cfg.task_names)  # mean over tasks
        return out

    def finish(model, final_checkpoint, module_state, step: int, metrics: dict) -> str:
        if not rank0:
            return ""
        if cfg.adashare is not None:
            return write_policies(cfg, model, step, metrics, evaluate)
        lines = []
        for name, part in zip(cfg.task_names, cfg.parts):
            plain = model.task_model(name, part.labels)
            folder = Path(part.output_dir)
            with atomic_directory(folder / EXPORT, replace=folder.joinpath(EXPORT).exists()) as tmp:
                save_classifier(plain, tmp, resolve_model_path(str(tokenizer_folder)))
            extra = {"steps": step, "validation": metrics, "config_hash": math_hash(cfg)}
            if cfg.policy is not None:  # AdaShare: which of the student's layers this task's model executes
                executed = cfg.policy[cfg.task_names.index(name)]
                extra.update(layers_executed=sum(executed), layers_of_student=len(executed), policy=executed)
            record = write_predictions(part, plain, tokenizer, folder, device, extra)
            lines.append(f"{name} {record['metrics']['accuracy']:.4f}")
        return f"multi-task {cfg.arm} fold {cfg.fold} seed {cfg.seed}: held-out accuracy " + ", ".join(lines)

    ds = deepspeed_config(cfg.engine, place.world_size, cfg.steps, source=str(cfg.output_dir))
    return loop.Job(config=cfg, ds_config=ds, module=module, batches=batches, evaluate=evaluate, finish=finish,
                    name=f"multitask {cfg.arm} f{cfg.fold} s{cfg.seed}")


def train_multitask(cfg: MultiTaskRunConfig) -> int:
    if completed(cfg):
        print(f"[finetune] {cfg.output_dir}: done (every task's eval.json present)", flush=True)
        return 0
    return loop.run(cfg, STAGE, partial(build_job, cfg))
