"""The task stage's sub-steps, each a function a user can also run alone (`python -m finetune <step>`):

  folds     stratified k-fold split files (folds/fold-K/{train,valid,test}.jsonl)
  teacher   fine-tune the teacher on each fold's training split, early stopping on its validation split
  transfer  the fold's task transfer set: `python -m data_pipeline` (a separate process: stages never
            import each other) on the training split, augmented, with the teacher's dense logits
  distill   the KD student and the no-KD baseline per fold and seed, on the training core
  speed     teacher and students timed side by side on the held-out fold (same batches, same threads)
  deploy    with deploy.enabled: each KD student's ONNX fp32 + int8 artefact, scored as the arm kd-int8
            (finetune.int8)
  report    report/ with the table, the bar chart, loss curves, configs and per-example predictions

Every step skips work that is complete for the same config (a run is complete when its eval.json exists
with the run's config hash) and refuses, naming it, a complete run made under another config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from kdlib.runtime.outputs import save_resolved
from kdlib.errors import OutputError
from kdlib.runtime.io import atomic_write_text
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.schemas import StudentConfig
from kdlib.training.config import math_hash
from kdlib.training.early_stop import EarlyStoppingConfig
from finetune.config import FinetuneConfig
from finetune.folds import make_folds, read_examples, write_fold
from finetune.layout import FOLDS_DIR, Layout
from finetune.run import EVAL_FILE, EXPORT, RunConfig, train_run
from finetune.transfer import build_transfer_set

# ---------------------------------------------------------------- folds

def folds_step(cfg: FinetuneConfig, labels: list[str]) -> None:
    """Write the split files (identical on every rerun: the split is a pure function of the data and split_seed)."""
    lay = Layout(cfg)
    examples = read_examples(cfg.task)
    for fold in make_folds(examples, cfg.evaluation.folds, cfg.evaluation.validation_fraction,
                           cfg.evaluation.split_seed, regression=cfg.task_type == "regression"):
        write_fold(fold, lay.fold_data(fold.index))
    atomic_write_text(lay.root / FOLDS_DIR / "labels.json", json.dumps(labels) + "\n")


# ---------------------------------------------------------------- run configs

def _loop_fields(cfg: FinetuneConfig, out: Path, steps: int, seed: int, eval_every: int) -> dict:
    every = eval_every * max(1, round(50 / eval_every))  # a checkpoint every ~50 steps, at an evaluation step
    return dict(output_dir=str(out), steps=steps, seed=seed, eval_every=eval_every, checkpoint_every=every,
                keep_checkpoints=1, threads=cfg.threads, progress_bar=cfg.progress_bar, log_every=1)


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
    return RunConfig(**_loop_fields(cfg, out, t.steps, teacher_seeds(cfg)[index], t.eval_every),
                     early_stopping=EarlyStoppingConfig(**early_stop_metric(cfg), patience=t.patience),
                     arm="teacher", name="teacher" if index == 0 else f"teacher-{index}", init=t.init or t.finetuned,
                     objectives=[ObjectiveConfig(name=hard_objective(cfg))], engine=t.engine,
                     trust_remote_code=t.trust_remote_code, **_fold_fields(cfg, fold, labels))


def student_start(cfg: FinetuneConfig) -> tuple[Optional[StudentConfig], Optional[str]]:
    """(shape built from the teacher, or None) and (student folder, or None): the same for KD and baseline."""
    d = cfg.distill
    if d.method == "theseus":  # the baseline: the successor's initial weights (teacher layers 1..n) alone
        n = d.theseus.successor_layers
        return StudentConfig(num_layers=n, init="explicit", init_layers=list(range(1, n + 1))), None
    if cfg.student.path is not None:
        return None, cfg.student.path
    return cfg.student.shape, None


def student_run(cfg: FinetuneConfig, fold: int, seed: int, arm: str, labels: list[str]) -> RunConfig:
    d = cfg.distill
    out = Layout(cfg).run(fold, arm, seed)
    shape, path = student_start(cfg)
    teacher = teacher_folder(cfg, fold)
    common = dict(**_loop_fields(cfg, out, d.steps, seed, d.eval_every), **_fold_fields(cfg, fold, labels),
                  engine=d.engine, teacher=teacher, init=path or teacher, trust_remote_code=cfg.student.trust_remote_code)
    if arm == "baseline":
        return RunConfig(arm="baseline", objectives=[ObjectiveConfig(name=hard_objective(cfg))], student_shape=shape,
                         **common)
    extra = range(1, len(teacher_seeds(cfg)))
    multi = dict(more_teachers=[teacher_folder(cfg, fold, i) for i in extra],
                 more_transfer_sets=[str(Layout(cfg).transfer(fold, i)) for i in extra],
                 multi_teacher=d.multi_teacher) if extra else {}
    return RunConfig(arm="kd", objectives=d.objectives, transfer_set=str(Layout(cfg).transfer(fold)), **multi,
                     student_shape=shape if d.method == "kd" else None, method=d.method,
                     theseus=d.theseus if d.method == "theseus" else None, layer_map=d.layer_map,
                     online_teacher=d.online_teacher, hard_labels=d.hard_labels, **common)


# ---------------------------------------------------------------- running runs

def completed(run: RunConfig) -> bool:
    """True when the run's eval.json exists for this config; a complete run of another config is refused."""
    path = Path(run.output_dir) / EVAL_FILE
    if not path.is_file():
        return False
    found = json.loads(path.read_text()).get("config_hash")
    if found != math_hash(run):
        raise OutputError(f"{run.output_dir}: holds a finished {run.arm} run made under config hash {found}, this "
                          f"config hashes to {math_hash(run)}; nothing was changed: use a new output_dir")
    return True


def execute(run: RunConfig) -> None:
    """Train one run unless it is complete; a run stopped by preemption (exit 75) stops the whole stage."""
    if completed(run):
        print(f"[finetune] {run.output_dir}: done (eval.json present)", flush=True)
        return
    code = train_run(run)
    if code != 0:
        raise SystemExit(code)
    for leftover in ("checkpoints", "best"):  # the export is kept; optimizer state and the best-weights copy are
        shutil.rmtree(Path(run.output_dir) / leftover, ignore_errors=True)  # not needed once the run is evaluated


def teacher_step(cfg: FinetuneConfig, labels: list[str], folds: list[int]) -> None:
    for fold in folds:
        if cfg.teacher.finetuned is not None:
            from finetune.evaluate import evaluate_given_teacher

            evaluate_given_teacher(cfg, fold, labels, Layout(cfg).run(fold, "teacher"))
        else:
            for index in range(len(teacher_seeds(cfg))):
                execute(teacher_run(cfg, fold, labels, index))


def transfer_step(cfg: FinetuneConfig, labels: list[str], folds: list[int], needs: dict) -> None:
    """Build each fold's transfer set by running the data pipeline as its own process."""
    for fold in folds:
        for index in range(len(teacher_seeds(cfg))):  # multi-teacher: one set per teacher, the same rows
            build_transfer_set(cfg, fold, labels, teacher_folder(cfg, fold, index), Layout(cfg).transfer(fold, index),
                               needs)


def distill_step(cfg: FinetuneConfig, labels: list[str], folds: list[int], seeds: list[int],
                 arms: list[str]) -> None:
    for fold in folds:
        for seed in seeds:
            for arm in arms:
                execute(student_run(cfg, fold, seed, arm, labels))


def arms_of(cfg: FinetuneConfig) -> list[str]:
    return ["kd"] + (["baseline"] if cfg.baseline.enabled else [])


def fold_run_folders(cfg: FinetuneConfig, fold: int) -> list[Path]:
    """Every run folder of a fold: its teachers, then each seed's arms."""
    lay = Layout(cfg)
    return ([lay.teacher(fold, i) for i in range(len(teacher_seeds(cfg)))]
            + [lay.run(fold, arm, seed) for seed in cfg.evaluation.seeds for arm in arms_of(cfg)])


def run_folders(cfg: FinetuneConfig) -> list[Path]:
    return [f for fold in range(cfg.evaluation.folds) for f in fold_run_folders(cfg, fold)]


def save_config(cfg: FinetuneConfig) -> None:
    save_resolved(cfg, Layout(cfg).root)
