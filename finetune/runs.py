"""The runs a finetune config makes, as RunConfigs: the fold's teachers, the KD student and the baseline, in the
folders finetune.layout names; and whether a run is already complete. The steps, the given-teacher evaluation and
the multi-task runs all build their runs here, so a run's config (and so its hash) is written once."""

from __future__ import annotations

from pathlib import Path

from kdlib.errors import OutputError
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.training.config import math_hash
from kdlib.training.early_stop import EarlyStoppingConfig
from kdlib.runtime.jsonl import json_document
from finetune.config import FinetuneConfig
from finetune.layout import BASELINE, KD, TEACHER, Layout
from finetune.methods import method_named
from finetune.run import EVAL_FILE, EXPORT, RunConfig


def checkpoint_every(eval_every: int) -> int:
    """A checkpoint every ~50 steps, at an evaluation step."""
    return eval_every * max(1, round(50 / eval_every))


def loop_fields(cfg: FinetuneConfig, out: Path, steps: int, seed: int, eval_every: int) -> dict:
    """The training-loop fields every task run shares (a LoopConfig's)."""
    return dict(output_dir=str(out), steps=steps, seed=seed, eval_every=eval_every,
                checkpoint_every=checkpoint_every(eval_every), keep_checkpoints=1, threads=cfg.threads,
                progress_bar=cfg.progress_bar, log_every=1, architectures=dict(cfg.architectures))


def _fold_fields(cfg: FinetuneConfig, fold: int, labels: list[str]) -> dict:
    lay = Layout(cfg)
    return dict(fold=fold, examples=str(lay.split(fold, "train")), valid_data=str(lay.split(fold, "valid")),
                test_data=str(lay.split(fold, "test")), labels=list(labels), max_length=cfg.max_length,
                task_type=cfg.task_type, tokenize_per_model=cfg.transfer.tokenize_per_model)


def early_stop_metric(cfg: FinetuneConfig) -> dict:
    """Validation accuracy; for regression the validation squared error (a few validation targets make Pearson
    jump between -1 and 1)."""
    return {"metric": "loss", "mode": "min"} if cfg.task_type == "regression" else {"metric": "accuracy", "mode": "max"}


def hard_objective(cfg: FinetuneConfig) -> str:
    """The loss on the labels alone (teacher fine-tuning, the baseline): cross-entropy, or squared error."""
    return "hard_mse" if cfg.task_type == "regression" else "hard_ce"


def teacher_seeds(cfg: FinetuneConfig) -> list[int]:
    """One seed per teacher of a fold: teacher.seeds for multi-teacher KD, else the first student seed."""
    return list(cfg.teacher.seeds) or [cfg.evaluation.seeds[0]]


def teacher_folder(cfg: FinetuneConfig, fold: int, index: int = 0) -> str:
    """The fold's fine-tuned teacher number `index`: its run's export, or the given fine-tuned folder."""
    if cfg.teacher.finetuned is not None:
        return cfg.teacher.finetuned
    return str(Layout(cfg).teacher(fold, index) / EXPORT)


def teacher_run(cfg: FinetuneConfig, fold: int, labels: list[str], index: int = 0) -> RunConfig:
    t = cfg.teacher
    out = Layout(cfg).teacher(fold, index)
    return RunConfig(**loop_fields(cfg, out, t.steps, teacher_seeds(cfg)[index], t.eval_every),
                     early_stopping=EarlyStoppingConfig(**early_stop_metric(cfg), patience=t.patience),
                     arm=TEACHER, name=TEACHER if index == 0 else f"{TEACHER}-{index}", init=t.init or t.finetuned,
                     objectives=[ObjectiveConfig(name=hard_objective(cfg))], engine=t.engine,
                     trust_remote_code=t.trust_remote_code, **_fold_fields(cfg, fold, labels))


def student_run(cfg: FinetuneConfig, fold: int, seed: int, arm: str, labels: list[str]) -> RunConfig:
    """The KD student (arm kd) or the no-KD baseline (arm baseline) of one fold and seed."""
    d = cfg.distill
    method = method_named(d.method)
    shape, path = (method.baseline_start if arm == BASELINE else method.student_start)(cfg)
    teacher = teacher_folder(cfg, fold)
    common = dict(**loop_fields(cfg, Layout(cfg).run(fold, arm, seed), d.steps, seed, d.eval_every),
                  **_fold_fields(cfg, fold, labels), engine=d.engine, teacher=teacher, init=path or teacher,
                  trust_remote_code=cfg.student.trust_remote_code, student_shape=shape)
    if arm == BASELINE:
        return RunConfig(arm=BASELINE, objectives=[ObjectiveConfig(name=hard_objective(cfg))], **common)
    extra = range(1, len(teacher_seeds(cfg)))
    multi = dict(more_teachers=[teacher_folder(cfg, fold, i) for i in extra],
                 more_transfer_sets=[str(Layout(cfg).transfer(fold, i)) for i in extra],
                 multi_teacher=d.multi_teacher) if extra else {}
    return RunConfig(arm=KD, objectives=d.objectives, transfer_set=str(Layout(cfg).transfer(fold)), **multi,
                     method=d.method, **method.run_fields(d), layer_map=d.layer_map, online_teacher=d.online_teacher,
                     hard_labels=d.hard_labels, **common)


def arms_of(cfg: FinetuneConfig) -> list[str]:
    """The student arms of a config: the KD student, and the baseline unless it is disabled."""
    return [KD] + ([BASELINE] if cfg.baseline.enabled else [])


def fold_run_folders(cfg: FinetuneConfig, fold: int) -> list[Path]:
    """Every run folder of a fold: its teachers, then each seed's arms."""
    lay = Layout(cfg)
    return ([lay.teacher(fold, i) for i in range(len(teacher_seeds(cfg)))]
            + [lay.run(fold, arm, seed) for seed in cfg.evaluation.seeds for arm in arms_of(cfg)])


def run_folders(cfg: FinetuneConfig) -> list[Path]:
    return [f for fold in range(cfg.evaluation.folds) for f in fold_run_folders(cfg, fold)]


def completed(run: RunConfig) -> bool:
    """True when the run's eval.json exists for this config; a complete run of another config is refused."""
    path = Path(run.output_dir) / EVAL_FILE
    if not path.is_file():
        return False
    found = json_document(path).get("config_hash")
    if found != math_hash(run):
        raise OutputError(f"{run.output_dir}: holds a finished {run.arm} run made under config hash {found}, this "
                          f"config hashes to {math_hash(run)}; nothing was changed: use a new output_dir")
    return True
