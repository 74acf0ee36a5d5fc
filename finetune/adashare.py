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
import io
import json
from pathlib import Path

import numpy as np

from kdlib.students.adashare import TaskPolicies, candidate_policies
from kdlib.runtime.io import atomic_target, atomic_write_bytes, atomic_write_text
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.training.config import math_hash
from finetune.config import FinetuneConfig
from finetune.layout import Layout

ARM = "adashare"
POLICIES_FILE = "policies.json"


def _folder(cfg: FinetuneConfig, fold: int, seed: int, name: str) -> Path:
    return Path(cfg.output_dir) / "multitask" / f"fold-{fold}" / f"seed-{seed}" / name


def search_run(cfg: FinetuneConfig, fold: int, seed: int, labels: dict):
    """The policy search: the dense multi-task KD run's data and objectives, plus the two regularisers."""
    from finetune.multitask import multitask_run

    a = cfg.multitask.adashare
    dense = multitask_run(cfg, fold, seed, "kd", labels)
    objectives = dense.objectives + [ObjectiveConfig(name="adashare_sparsity", weight=a.sparsity_weight),
                                     ObjectiveConfig(name="adashare_sharing", weight=a.sharing_weight)]
    every = dense.eval_every * max(1, round(50 / dense.eval_every))
    return dataclasses.replace(dense, output_dir=str(_folder(cfg, fold, seed, "adashare-search")), arm="adashare-search",
                               steps=a.search_steps, checkpoint_every=every, objectives=objectives, adashare=a)


def retrain_run(cfg: FinetuneConfig, fold: int, seed: int, labels: dict, policy: list[list[bool]]):
    """The retraining: the dense run again (same initialisation, objectives and steps) with the policies fixed."""
    from finetune.multitask import multitask_run, task_config

    dense = multitask_run(cfg, fold, seed, "kd", labels)
    parts = [dataclasses.replace(p, output_dir=str(Layout(task_config(cfg, i)).run(fold, f"multitask-{ARM}", seed)),
                                 name=f"multitask-{ARM}") for i, p in enumerate(dense.parts)]
    return dataclasses.replace(dense, output_dir=str(_folder(cfg, fold, seed, ARM)), arm=ARM, parts=parts,
                               policy=policy)


def search_completed(run) -> bool:
    path = Path(run.output_dir) / POLICIES_FILE
    return path.is_file() and json.loads(path.read_text()).get("config_hash") == math_hash(run)


def read_policy(run) -> list[list[bool]]:
    return json.loads((Path(run.output_dir) / POLICIES_FILE).read_text())["policy"]


def validation_score(student, policy: list[list[bool]], evaluate) -> float:
    """Mean validation accuracy over the tasks with `policy` fixed on the searched weights (policies restored)."""
    learned = student.policies
    student.policies = TaskPolicies(learned.num_tasks, learned.num_layers, fixed=policy)
    try:
        return float(evaluate(student)["accuracy"])
    finally:
        student.policies = learned


def write_policies(run, student, step: int, metrics: dict, evaluate) -> str:
    """Choose the fixed policy (candidate_policies, scored on validation), then write student.safetensors (the
    searched weights and policy logits), policies.png and policies.json (learned probabilities, the candidates
    and their scores, the chosen policy, the config hash; written last); a summary line."""
    from safetensors.torch import save_file

    policies: TaskPolicies = student.policies
    probs = policies.select_probs().detach().double().cpu().numpy()
    candidates = candidate_policies(probs, run.adashare, run.seed, run.fold)
    scores = [validation_score(student, c, evaluate) for c in candidates]
    best = int(np.argmax(scores))  # the first of equals: the most probable policy wins a tie
    policy = candidates[best]
    record = {"tasks": run.task_names, "layers": policies.num_layers, "select_probability": probs.tolist(),
              "policy": policy, "drawn_by": run.adashare.policy, "candidates": candidates,
              "candidate_validation_accuracy": scores, "chosen": best, "seed": run.seed, "steps": step,
              "validation": metrics, "config_hash": math_hash(run)}
    out = Path(run.output_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    with atomic_target(out / "student.safetensors") as tmp:
        save_file(state, tmp)
    _plot(probs, policy, run.task_names, out / "policies.png")
    atomic_write_text(out / POLICIES_FILE, json.dumps(record, indent=1) + "\n")  # last: the search is done
    shown = "; ".join(f"{name} executes {sum(p)}/{len(p)} layers ({''.join('x' if v else '.' for v in p)})"
                      for name, p in zip(run.task_names, policy))
    return f"AdaShare search fold {run.fold} seed {run.seed}: {shown}"


def _plot(probs: np.ndarray, policy: list[list[bool]], tasks: list[str], path: Path) -> None:
    """Heat map of p(execute) per task and layer, the fixed draw marked (x executes, . skips)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * probs.shape[1], 0.8 + 0.6 * len(tasks)))
    image = ax.imshow(probs, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for t, row in enumerate(policy):
        for layer, executed in enumerate(row):
            ax.text(layer, t, f"{probs[t, layer]:.2f}\n{'x' if executed else '.'}", ha="center", va="center",
                    color="white" if probs[t, layer] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(probs.shape[1]), [f"layer {i + 1}" for i in range(probs.shape[1])])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_title("AdaShare: p(execute) per task and layer; x = executed after the draw")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def run_adashare(cfg: FinetuneConfig, labels: dict, folds: list[int], seeds: list[int]) -> None:
    """Search, then retrain, for every fold and seed; finished runs are skipped; a preempted run stops the stage."""
    from finetune.multitask import train_multitask

    for fold in folds:
        for seed in seeds:
            search = search_run(cfg, fold, seed, labels)
            for run in (search, None):
                run = run or retrain_run(cfg, fold, seed, labels, read_policy(search))
                code = train_multitask(run)
                if code != 0:
                    raise SystemExit(code)
