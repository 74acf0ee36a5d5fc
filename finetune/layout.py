"""Where everything of a finetune output_dir lives (one place, so steps run alone find each other's files), and
the arm names that are both run folder names and eval.json's "arm"."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

STEPS = ("folds", "teacher", "transfer", "distill", "speed", "deploy", "report")  # the stage's sub-steps, in order
FOLDS_DIR = "folds"
REPORT_DIR = "report"
MULTITASK_DIR = "multitask"
TEACHER, KD, BASELINE = "teacher", "kd", "baseline"  # the arms every task run compares


class Layout:
    """Where everything of a finetune output_dir lives."""

    def __init__(self, cfg):
        self.root = Path(cfg.output_dir)

    def fold_data(self, fold: int) -> Path:
        return self.root / FOLDS_DIR / f"fold-{fold}"

    def split(self, fold: int, name: str) -> Path:
        return self.fold_data(fold) / f"{name}.jsonl"

    def run(self, fold: int, arm: str, seed: Optional[int] = None) -> Path:
        base = self.root / f"fold-{fold}"
        return base / arm if arm == TEACHER else base / f"seed-{seed}" / arm

    def transfer(self, fold: int, teacher: int = 0) -> Path:
        """The transfer set of the fold's teacher number `teacher` (0: the first; multi-teacher KD has more)."""
        return self.root / f"fold-{fold}" / ("transfer_set" if teacher == 0 else f"transfer_set-{teacher}")

    def teacher(self, fold: int, teacher: int = 0) -> Path:
        return self.run(fold, TEACHER) if teacher == 0 else self.root / f"fold-{fold}" / f"teacher-{teacher}"

    def report(self) -> Path:
        return self.root / REPORT_DIR

    def multitask(self, fold: int, seed: int, name: str) -> Path:
        """A multi-task run's own folder (its checkpoints, logs, AdaShare policies); each task's results are in
        that task's folder."""
        return self.root / MULTITASK_DIR / f"fold-{fold}" / f"seed-{seed}" / name
