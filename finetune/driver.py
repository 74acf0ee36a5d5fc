"""The steps in order, restricted to the folds, seeds and arms asked for; see finetune.steps."""

from __future__ import annotations

from typing import Optional

from kdlib.errors import ConfigError
from finetune.config import FinetuneConfig
from finetune.layout import Layout
from finetune.steps import (arms_of, distill_step, fold_run_folders, folds_step, run_folders, save_config, teacher_step,
                            transfer_step)


def _subset(name: str, asked: Optional[list[int]], allowed: list, source: str) -> list:
    if not asked:
        return list(allowed)
    bad = [a for a in asked if a not in allowed]
    if bad:
        raise ConfigError(f"{source}: --{name} {bad}: expected one of {allowed}")
    return list(asked)


def run_steps(cfg: FinetuneConfig, setup, source: str, *, step: str = "all", folds=None, seeds=None, arms=None) -> int:
    """Run `step` (or all of them); returns 0 (a preempted run raises SystemExit(75) through)."""
    from finetune.evaluate import speed_step

    fold_list = _subset("fold", folds, list(range(cfg.evaluation.folds)), source)
    seed_list = _subset("seed", seeds, list(cfg.evaluation.seeds), source)
    arm_list = _subset("arm", arms, arms_of(cfg), source)
    labels = setup.labels
    lay = Layout(cfg)
    every = step == "all"
    if every or step == "folds" or not (lay.root / "folds" / "labels.json").is_file():
        save_config(cfg)
        folds_step(cfg, labels)
    if every or step == "teacher":
        teacher_step(cfg, labels, fold_list)
    if every or step == "transfer":
        transfer_step(cfg, labels, fold_list, setup.needs)
    if every or step == "distill":
        distill_step(cfg, labels, fold_list, seed_list, arm_list)
    if every or step == "speed":
        speed_step(cfg, labels, fold_list, lambda fold: fold_run_folders(cfg, fold))
    if every or step == "report":
        from finetune.report import write_report

        folders = [f for f in run_folders(cfg) if (f / "eval.json").is_file()]
        path = write_report(lay.report(), folders, title=f"Task distillation: {cfg.task.path}",
                            configs={"finetune": str(lay.root / "resolved_config.yaml")})
        print(f"[finetune] report: {path}", flush=True)
    return 0
