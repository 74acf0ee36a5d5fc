"""The student before any training step, as a plain Hugging Face folder: the baseline row of an evaluation.

`python -m pretrain --config X.yaml --export-init DIR` builds the student exactly as step 0 of the run
would (same shape, same initialisation from teacher layers, same seed) and saves it with the teacher's
tokenizer, so `python -m evaluate` can show what distillation added over copying layers.
"""

from __future__ import annotations

from pathlib import Path

from kdlib.runtime.io import atomic_directory
from kdlib.runtime.models import copy_tokenizer_files
from pretrain.student import build_student


def export_init(cfg, setup, folder: str | Path) -> Path:
    """Write the untrained student (weights, config, tokenizer) into `folder`, replacing an older one."""
    folder = Path(folder)
    model = build_student(cfg.teacher, setup.teacher_config, cfg.student, cfg.seed)
    with atomic_directory(folder, replace=folder.exists()) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(setup.student_tokenizer_folder, tmp)
        (tmp / "README.md").write_text(f"# Untrained student of `{cfg.teacher.path}`\n\nBuilt by `python -m pretrain "
                                       f"--export-init` from {setup.source} (student {cfg.student}, seed {cfg.seed}); "
                                       "no distillation step has run.\n")
    return folder
