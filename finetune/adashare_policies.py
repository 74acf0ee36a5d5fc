"""The AdaShare search's result, policies.json: the fixed per-task layer policy chosen on the validation split from
the learned select probabilities (kdlib.students.adashare), with the searched weights and a heat map beside it.
The multi-task run writes it when a search ends; finetune.adashare reads it to retrain."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from kdlib.runtime.io import atomic_target, atomic_write_bytes, atomic_write_text
from kdlib.runtime.plots import pyplot
from kdlib.students.adashare import TaskPolicies, candidate_policies
from kdlib.training.config import math_hash
from kdlib.runtime.jsonl import json_document

POLICIES_FILE = "policies.json"


def search_completed(run) -> bool:
    path = Path(run.output_dir) / POLICIES_FILE
    return path.is_file() and json_document(path).get("config_hash") == math_hash(run)


def read_policy(run) -> list[list[bool]]:
    return json_document(Path(run.output_dir) / POLICIES_FILE)["policy"]


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
    plt = pyplot()
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
