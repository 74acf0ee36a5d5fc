"""Early stopping on a held-out metric, with the best weights kept on disk so a kill loses nothing.

At every evaluation the tracker compares the metric with the best so far; an improvement (by more
than `min_delta`) saves the student's weights to `<output_dir>/best/model.safetensors` (rank 0,
atomically) and resets the patience count. After `patience` evaluations without improvement the
run stops. The tracker's state is part of the trainer's checkpoint state, so a resumed run stops
where the uninterrupted one would have; at the end the loop loads the best weights back into the
student, so the final evaluation and the export are the best model's.

Supported for ZeRO 0-2, where every rank holds the full student weights (task models are small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file

from kdlib.runtime.io import atomic_target

BEST_DIR = "best"
BEST_FILE = "model.safetensors"


@dataclass
class EarlyStoppingConfig:
    """Stop when a held-out metric has not improved for `patience` evaluations (needs eval_every > 0)."""

    metric: str  # a key of the stage's evaluation metrics, e.g. accuracy, macro_f1, loss
    mode: Literal["max", "min"] = "max"  # max: higher is better (accuracy); min: lower is better (loss)
    patience: int = 3  # evaluations without improvement before training stops
    min_delta: float = 0.0  # an improvement must exceed this

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric: expected a metric name, got {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"patience: expected a positive integer, got {self.patience}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta: expected >= 0, got {self.min_delta}")


class EarlyStopping:
    """The best value so far, its step, evaluations since; `update` says whether the weights improved."""

    def __init__(self, config: EarlyStoppingConfig, out: Path):
        self.config, self.folder = config, out / BEST_DIR
        self.best: Optional[float] = None
        self.best_step = -1
        self.since = 0
        self.stopped = False

    def _better(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        delta = value - self.best if self.config.mode == "max" else self.best - value
        return delta > self.config.min_delta

    def update(self, metrics: dict, step: int) -> bool:
        """Record one evaluation; True when it is the best so far (the caller saves the weights)."""
        if self.config.metric not in metrics:
            raise KeyError(f"early_stopping.metric: {self.config.metric!r} is not among the evaluation metrics "
                           f"{sorted(metrics)}")
        value = float(metrics[self.config.metric])
        if self._better(value):
            self.best, self.best_step, self.since = value, step, 0
            return True
        self.since += 1
        self.stopped = self.since >= self.config.patience
        return False

    def save(self, student: torch.nn.Module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in student.state_dict().items()}
        with atomic_target(self.folder / BEST_FILE) as tmp:
            save_file(state, str(tmp))

    def restore(self, student: torch.nn.Module) -> bool:
        """Load the best weights into `student` (same dtype and device as its own); False when none were saved."""
        path = self.folder / BEST_FILE
        if self.best is None or not path.is_file():
            return False
        best = load_file(str(path))
        own = student.state_dict()
        student.load_state_dict({k: best[k].to(dtype=v.dtype, device=v.device) for k, v in own.items()})
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since": self.since, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], int(state["best_step"])
        self.since, self.stopped = int(state["since"]), bool(state["stopped"])
