"""The task stage's sub-steps, each a function a user can also run alone (`python -m finetune <step>`):

  folds     stratified k-fold split files (folds/fold-K/{train,valid,test}.jsonl); evaluation.mode split: fold 0
            from the task's hashed split, plus folds/fold-0/unlabeled.jsonl (transfer.unlabeled texts)
  teacher   fine-tune the teacher on each fold's training split, early stopping on its validation split
  transfer  the fold's task transfer set: `python -m data_pipeline` (a separate process: stages never
            import each other) on the training split, augmented, with the teacher's dense logits
  distill   the KD student and the no-KD baseline per fold and seed, on the training core
  speed     teacher and students timed side by side on the held-out fold (same batches, same threads)
  deploy    with deploy.enabled: each KD student's ONNX fp32 + int8 artefact, scored as the arm kd-int8
            (finetune.int8)
  report    report/ with the table, the bar chart, loss curves, configs and per-example predictions

Every step skips work that is complete for the same config (a run is complete when its eval.json exists
with the run's config hash) and refuses, naming it, a complete run made under another config. The runs
themselves are finetune.runs'; speed is finetune.evaluate's, deploy finetune.int8's, and finetune.driver
runs the steps in order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.process_group import dist_env
from kdlib.runtime.outputs import check_output_folder, save_resolved
from finetune.config import FinetuneConfig
from finetune.evaluate import evaluate_given_teacher
from finetune.folds import make_folds, make_split_fold, read_examples, write_fold, write_unlabeled
from finetune.layout import FOLDS_DIR, MULTITASK_DIR, TEACHER, Layout
from finetune.run import RunConfig, train_run
from finetune.runs import completed, student_run, teacher_folder, teacher_run, teacher_seeds
from finetune.transfer import build_transfer_set

STAGE = "python -m finetune"
LAUNCH_LOGS = "slurm"  # `python -m launch slurm` makes output_dir/slurm/ for its logs before the job's first step


def folds_step(cfg: FinetuneConfig, labels: list[str]) -> None:
    """Write the split files (identical on every rerun: the split is a pure function of the data and split_seed)."""
    lay = Layout(cfg)
    examples = read_examples(cfg.task)
    if cfg.evaluation.mode == "split":  # one fold from the task's hashed split, plus its unlabeled texts
        e = cfg.evaluation
        fold, unlabeled = make_split_fold(examples, e.labelled, e.max_valid, cfg.transfer.unlabeled, e.split_seed,
                                          regression=cfg.task_type == "regression")
        write_fold(fold, lay.fold_data(0))
        write_unlabeled(unlabeled, lay.fold_data(0))
        atomic_write_text(lay.root / FOLDS_DIR / "labels.json", json.dumps(labels) + "\n")
        return
    for fold in make_folds(examples, cfg.evaluation.folds, cfg.evaluation.validation_fraction,
                           cfg.evaluation.split_seed, regression=cfg.task_type == "regression"):
        write_fold(fold, lay.fold_data(fold.index))
    atomic_write_text(lay.root / FOLDS_DIR / "labels.json", json.dumps(labels) + "\n")


def execute(run: RunConfig) -> None:
    """Train one run unless it is complete; a run stopped by preemption (exit 75) stops the whole stage."""
    if completed(run):
        print(f"[finetune] {run.output_dir}: done (eval.json present)", flush=True)
        return
    code = train_run(run)
    if code != 0:
        raise SystemExit(code)
    if dist_env().rank != 0:  # every rank has finished the run (the loop's last barrier); rank 0 tidies up
        return
    for leftover in ("checkpoints", "best"):  # the export is kept; optimizer state and the best-weights copy are
        shutil.rmtree(Path(run.output_dir) / leftover, ignore_errors=True)  # not needed once the run is evaluated


def teacher_step(cfg: FinetuneConfig, labels: list[str], folds: list[int]) -> None:
    for fold in folds:
        if cfg.teacher.finetuned is not None:
            evaluate_given_teacher(cfg, fold, labels, Layout(cfg).run(fold, TEACHER))
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


def save_config(cfg: FinetuneConfig) -> None:
    save_resolved(cfg, Layout(cfg).root)


def check_root(cfg: FinetuneConfig) -> None:
    """output_dir must be absent, empty or this stage's own (its folds/labels.json, or only the resolved config the
    stage writes first, or the launcher's logs; with several tasks, only its task folders and multitask/): a
    transfer set, another stage's run or a person's files are refused before any step."""
    root = Layout(cfg).root
    ours = root.is_dir() and (_ours_multitask(root, cfg) if cfg.tasks else _ours(root))
    check_output_folder(root, stage=STAGE, found_claim=STAGE if ours else None, claim=STAGE, overwrite=False)


def _ours_multitask(root: Path, cfg: FinetuneConfig) -> bool:
    """A multi-task output_dir holds nothing but each task's own output_dir (finetune.multitask.task_config) and the
    multi-task runs' folder; a task folder is checked as a single-task output_dir."""
    names = {t.name for t in cfg.tasks}
    for entry in root.iterdir():
        if entry.name.startswith(".lock") or (entry.name in (MULTITASK_DIR, LAUNCH_LOGS) and entry.is_dir()):
            continue
        if not (entry.name in names and entry.is_dir() and (not any(entry.iterdir()) or _ours(entry))):
            return False
    return True


def _ours(root: Path) -> bool:
    if (root / FOLDS_DIR / "labels.json").is_file():
        return True
    names = {p.name for p in root.iterdir() if not p.name.startswith(".lock")}
    if names == {LAUNCH_LOGS} and (root / LAUNCH_LOGS).is_dir():
        return True
    if not names <= {"resolved_config.yaml", FOLDS_DIR, LAUNCH_LOGS}:
        return False
    try:  # a run killed between writing its resolved config and its folds
        data = yaml.safe_load((root / "resolved_config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and {"task", "evaluation", "distill", "baseline"} <= set(data)
