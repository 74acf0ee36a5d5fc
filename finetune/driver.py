"""The steps in order, restricted to the folds, seeds and arms asked for; see finetune.steps. With several tasks,
each task runs the single-task steps in its own folder, then the multi-task student trains per fold and seed,
then each task's speed and report include it (finetune.multitask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from kdlib.errors import ConfigError
from finetune.adashare import ARM as ADASHARE, run_adashare
from finetune.config import FinetuneConfig
from finetune.evaluate import speed_step
from finetune.int8 import deploy_step, deployment_section, int8_folders
from finetune.layout import FOLDS_DIR, KD, STEPS, Layout
from finetune.multitask import multitask_run, task_config, train_multitask
from finetune.report import write_report
from finetune.run import EVAL_FILE
from finetune.runs import arms_of, fold_run_folders, run_folders
from finetune.steps import distill_step, folds_step, save_config, teacher_step, transfer_step


def _subset(name: str, asked: Optional[list[int]], allowed: list, source: str) -> list:
    if not asked:
        return list(allowed)
    bad = [a for a in asked if a not in allowed]
    if bad:
        raise ConfigError(f"{source}: --{name} {bad}: expected one of {allowed}")
    return list(asked)


@dataclass(frozen=True)
class Selection:
    """The folds, seeds and arms a command runs (--fold / --seed / --arm; all of the config's when not given)."""

    folds: list[int]
    seeds: list[int]
    arms: list[str]


def select(cfg: FinetuneConfig, source: str, folds=None, seeds=None, arms=None) -> Selection:
    """The flags checked against the config, before any step and under --check too."""
    return Selection(_subset("fold", folds, list(range(cfg.evaluation.folds)), source),
                     _subset("seed", seeds, list(cfg.evaluation.seeds), source),
                     _subset("arm", arms, arms_of(cfg), source))


def run_steps(cfg: FinetuneConfig, setup, source: str, chosen: Selection, *, step: str = "all", steps: tuple = STEPS,
              extra_runs: Callable[[int], list] = lambda fold: []) -> int:
    """Run `step` (or all of `steps`) on the `chosen` folds, seeds and arms; returns 0 (a preempted run raises
    SystemExit(75) through). `extra_runs(fold)`: run folders trained elsewhere (the multi-task student's) that speed
    and report include."""
    fold_list, seed_list, arm_list = chosen.folds, chosen.seeds, chosen.arms
    labels = setup.labels
    lay = Layout(cfg)

    def wanted(name: str) -> bool:
        return name in steps and step in ("all", name)

    if wanted("folds") or not (lay.root / FOLDS_DIR / "labels.json").is_file():
        save_config(cfg)
        folds_step(cfg, labels)
    if wanted("teacher"):
        teacher_step(cfg, labels, fold_list)
    if wanted("transfer"):
        transfer_step(cfg, labels, fold_list, setup.needs)
    if wanted("distill"):
        distill_step(cfg, labels, fold_list, seed_list, arm_list)
    if wanted("speed"):
        speed_step(cfg, labels, fold_list, lambda fold: fold_run_folders(cfg, fold) + extra_runs(fold))
    if wanted("deploy"):
        deploy_step(cfg, labels, fold_list, seed_list)
    if wanted("report"):
        folders = [f for f in run_folders(cfg) + [e for k in range(cfg.evaluation.folds) for e in extra_runs(k)]
                   if (f / EVAL_FILE).is_file()] + int8_folders(cfg)
        path = write_report(lay.report(), folders, title=f"Task distillation: {cfg.task.path}",
                            configs={"finetune": str(lay.root / "resolved_config.yaml")},
                            appendix=deployment_section(cfg))
        print(f"[finetune] report: {path}", flush=True)
    return 0


def run_multitask_steps(cfg: FinetuneConfig, setups: dict, source: str, chosen: Selection, *, step: str = "all") -> int:
    """Each task's single-task steps, the multi-task students, then each task's speed and report."""
    tasks = [task_config(cfg, i) for i in range(len(cfg.tasks))]
    single = ("folds", "teacher", "transfer") + (("distill",) if cfg.multitask.single_task else ())
    for derived in tasks:
        run_steps(derived, setups[derived.output_dir], source, chosen, step=step, steps=single)
    fold_list, seed_list, arm_list = chosen.folds, chosen.seeds, chosen.arms
    labels = {t.name: setups[d.output_dir].labels for t, d in zip(cfg.tasks, tasks)}
    if step in ("all", "distill"):
        for fold in fold_list:
            for seed in seed_list:
                for arm in arm_list:
                    code = train_multitask(multitask_run(cfg, fold, seed, arm, labels))
                    if code != 0:
                        raise SystemExit(code)
        if cfg.multitask.adashare.enabled and KD in arm_list:
            run_adashare(cfg, labels, fold_list, seed_list)
    multi_arms = arms_of(cfg) + ([ADASHARE] if cfg.multitask.adashare.enabled else [])
    for derived in tasks:
        lay = Layout(derived)
        run_steps(derived, setups[derived.output_dir], source, chosen, step=step, steps=("speed", "deploy", "report"),
                  extra_runs=lambda fold, lay=lay: [lay.run(fold, f"multitask-{a}", s) for s in cfg.evaluation.seeds
                                                    for a in multi_arms])
    return 0
