"""The student before any training step, as a plain Hugging Face folder: the baseline row of an evaluation.

`python -m pretrain --config X.yaml --export-init DIR` builds the student exactly as step 0 of the run
would (same shape, same initialisation from teacher layers, same seed) and saves it with the teacher's
tokenizer, so `python -m evaluate` can show what distillation added over copying layers. DIR is checked
before anything loads (`check_init_folder`): a folder of someone else's (a person's files, a teacher, a run)
is never replaced; an earlier export, known by its init_export.json, is. Like the trained export it loads
everywhere (kdlib.students.portable: the pooler AutoModel expects, the sentence-transformers files of a
sentence-transformers teacher), so the baseline row is loaded the same way as the student it is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdlib.errors import KDError
from kdlib.runtime.io import atomic_directory, atomic_write_text
from kdlib.runtime.outputs import check_output_folder, output_lock, read_stamp
from kdlib.students.portable import save_portable
from pretrain.export import command_line
from pretrain.student import build_student

STAGE = "python -m pretrain --export-init"
STAMP = "init_export.json"  # what makes a folder an earlier export of this flag, replaceable by the next


def _earlier_export(folder: Path) -> str | None:
    """The config hash an earlier --export-init recorded in `folder`, None for anything else."""
    try:
        stamp = read_stamp(folder, STAMP, STAGE) if folder.is_dir() else None
    except ValueError:  # unreadable: not provably ours, so not replaced
        return None
    return stamp.get("config_hash", "unknown") if stamp else None


def check_init_folder(value: str, cfg) -> str:
    """What writing `--export-init value` does ("new", or "replace" an earlier export); KDError naming the flag for
    an empty path or one on more than one line, a file, or a folder this flag did not write."""
    if not value.strip() or not value.isprintable():
        raise KDError(f"--export-init: expected a folder path on one line, got {value!r}")
    return check_output_folder(Path(value), stage=STAGE, found_claim=_earlier_export(Path(value)),
                               claim=cfg.math_hash(), overwrite=True, where="--export-init")


def export_init(cfg, setup, folder: str | Path) -> Path:
    """Write the untrained student (weights, config, tokenizer, stamp) into `folder`, replacing an earlier export."""
    folder = Path(folder)
    with output_lock(folder, STAGE):
        state = check_init_folder(str(folder), cfg)  # again under the lock: nobody swapped it in between
        model = build_student(cfg.teacher, setup.teacher_config, cfg.student, cfg.seed)
        with atomic_directory(folder, replace=state != "new") as tmp:
            portable = save_portable(model, tmp, setup.student_tokenizer_folder, setup.teacher_folder,
                                     setup.teacher_config, init=cfg.student.init, seed=cfg.seed)
            added = (f"\n`AutoModel` misses no weight: {', '.join(portable.added)} {portable.source}.\n"
                     if portable.added else "")
            sentence = ("\n`SentenceTransformer(folder)` loads it (mean pooling, as the evaluation pools).\n"
                        if portable.sentence_transformers else "")
            (tmp / "README.md").write_text(f"# Untrained student of `{cfg.teacher.path}`\n\nBuilt by `python -m "
                                           f"pretrain --export-init` from {setup.source} (student {cfg.student}, "
                                           f"seed {cfg.seed}); no distillation step has run.\n{added}{sentence}"
                                           f"\n```\n{command_line()}\n```\n")
            atomic_write_text(tmp / STAMP, json.dumps({"stage": STAGE, "config_hash": cfg.math_hash()}))
    return folder

