"""AdaShare for the multi-task student (kdlib.students.adashare), per fold and seed, in two runs on the training core:

  search   output_dir/multitask/fold-K/seed-S/adashare-search/: the weights and the (task, layer) policies learn
           together (warm-up, then the top-down curriculum), with the sparsity and sharing regularisers; at the
           end candidate policies are drawn and the best on the validation split is written to policies.json
           (+ policies.png);
  retrain  output_dir/multitask/fold-K/seed-S/adashare/: the student starts again from its initialisation with
           those policies fixed, so each task executes only its selected layers; each task's export (a plain
           classifier with only those layers), eval.json and predictions land in
           output_dir/<task>/fold-K/seed-S/multitask-adashare/, beside the dense multi-task and single-task arms.
"""

from __future__ import annotations

import dataclasses

from kdlib.losses.objectives import ObjectiveConfig
from finetune.config import FinetuneConfig
from finetune.adashare_policies import read_policy
from finetune.layout import KD, Layout
from finetune.multitask import multitask_run, task_config, train_multitask

ARM = "adashare"


def search_run(cfg: FinetuneConfig, fold: int, seed: int, labels: dict):
    """The policy search: the dense multi-task KD run's data and objectives, plus the two regularisers."""
    a = cfg.multitask.adashare
    dense = multitask_run(cfg, fold, seed, KD, labels)
    objectives = dense.objectives + [ObjectiveConfig(name="adashare_sparsity", weight=a.sparsity_weight),
                                     ObjectiveConfig(name="adashare_sharing", weight=a.sharing_weight)]
    return dataclasses.replace(dense, output_dir=str(Layout(cfg).multitask(fold, seed, f"{ARM}-search")),
                               arm=f"{ARM}-search", steps=a.search_steps, objectives=objectives, adashare=a)


def retrain_run(cfg: FinetuneConfig, fold: int, seed: int, labels: dict, policy: list[list[bool]]):
    """The retraining: the dense run again (same initialisation, objectives and steps) with the policies fixed."""
    dense = multitask_run(cfg, fold, seed, KD, labels)
    parts = [dataclasses.replace(p, output_dir=str(Layout(task_config(cfg, i)).run(fold, f"multitask-{ARM}", seed)),
                                 name=f"multitask-{ARM}") for i, p in enumerate(dense.parts)]
    return dataclasses.replace(dense, output_dir=str(Layout(cfg).multitask(fold, seed, ARM)), arm=ARM, parts=parts,
                               policy=policy)


def run_adashare(cfg: FinetuneConfig, labels: dict, folds: list[int], seeds: list[int]) -> None:
    """Search, then retrain, for every fold and seed; finished runs are skipped; a preempted run stops the stage."""
    for fold in folds:
        for seed in seeds:
            search = search_run(cfg, fold, seed, labels)
            for run in (search, None):
                run = run or retrain_run(cfg, fold, seed, labels, read_policy(search))
                code = train_multitask(run)
                if code != 0:
                    raise SystemExit(code)
