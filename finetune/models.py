"""The models of a task run: the teacher's classifier (an encoder plus a new head), the student (a student
folder plus a new head, or a shape built from the fine-tuned teacher with its layers copied in), and their
export. Offline and safetensors only, like every load in this project (kdlib.runtime.models)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from kdlib.errors import ModelLoadError
from kdlib.runtime.models import check_model_folder, copy_tokenizer_files, quiet_transformers, resolve_model_path
from kdlib.schemas import StudentConfig
from kdlib.students.shape import init_from_teacher, student_config

HEAD_PREFIXES = ("classifier.", "bert.pooler.", "score.")  # weights a masked-LM, bare encoder or decoder LM folder may lack (GPT-2 / Llama heads are "score")


def label_maps(labels: list[str]) -> dict:
    return {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}


def load_classifier(ref: str, labels: list[str], *, seed: int, trust_remote_code: bool = False,
                    new_head: bool = True, regression: bool = False) -> torch.nn.Module:
    """A sequence classifier from a folder: its own head when it has one for these labels, else a new head
    (seeded; only the classifier and pooler may be new: any other missing weight is an error)."""
    folder = resolve_model_path(ref)
    check_model_folder(folder)
    quiet_transformers()
    torch.manual_seed(seed)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=len(labels), local_files_only=True, use_safetensors=True,
            trust_remote_code=trust_remote_code, output_loading_info=True,
            problem_type="regression" if regression else "single_label_classification", **label_maps(labels))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder}: cannot load as a sequence classifier: {err}") from None
    missing = [k for k in info.get("missing_keys", []) if not (new_head and k.startswith(HEAD_PREFIXES))]
    if missing:
        raise ModelLoadError(f"{folder}: {len(missing)} encoder weights are missing and would be random, "
                             f"e.g. {', '.join(missing[:3])}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched and not new_head:
        raise ModelLoadError(f"{folder}: its classifier head does not fit {len(labels)} labels ({mismatched[:2]})")
    model.train()
    return model


def student_from_teacher(teacher: torch.nn.Module, shape: StudentConfig, labels: list[str], seed: int,
                         regression: bool = False):
    """A classifier of the teacher's family with `shape`, teacher layers copied in per shape.init (the head and
    pooler too, when widths match), the rest seeded."""
    torch.manual_seed(seed)
    config = student_config(teacher.config, shape)
    config.num_labels = len(labels)
    config.problem_type = "regression" if regression else "single_label_classification"
    for key, value in label_maps(labels).items():
        setattr(config, key, value)
    model = AutoModelForSequenceClassification.from_config(config)
    init_from_teacher(model, teacher, shape)
    model.train()
    return model


def save_classifier(model: torch.nn.Module, folder: Path, tokenizer_from: Path) -> None:
    """config.json + model.safetensors + the tokenizer files, written into `folder` (already a staging folder)."""
    quiet_transformers()  # its shard-writing bar says nothing our own line does not
    model.save_pretrained(str(folder), safe_serialization=True)
    copy_tokenizer_files(resolve_model_path(str(tokenizer_from)), folder)
