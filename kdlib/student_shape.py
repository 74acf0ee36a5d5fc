"""A student of the teacher's config family: the teacher's config.json with the shape fields replaced,
and teacher layers copied into it (DistilBERT's every-other initialisation, or an explicit list).

Shared by every stage that builds a student from a teacher: pretrain (masked-LM students) and
finetune (classifier students, BERT-PKD's skip initialisation). Nothing here knows about heads: the
caller builds the model class it needs from `student_config` and calls `copy_teacher_layers`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kdlib.schemas import StudentConfig

_LAYER = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")


def student_config(teacher_config, student: StudentConfig):
    """A copy of the teacher's transformers config with the student's shape."""
    cfg = teacher_config.__class__.from_dict(teacher_config.to_dict())
    cfg.num_hidden_layers = student.num_layers
    if student.hidden_size is not None:
        cfg.hidden_size = student.hidden_size
    if student.num_attention_heads is not None:
        cfg.num_attention_heads = student.num_attention_heads
    if student.intermediate_size is not None:
        cfg.intermediate_size = student.intermediate_size
    cfg.architectures = None
    return cfg


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, teacher_layers: list[int],
                        skip_missing: tuple[str, ...] = ()) -> None:
    """Student layer i <- teacher layer teacher_layers[i] (1-based); every non-layer weight copied as is.
    Weights whose name starts with one of `skip_missing` keep their own values when the teacher lacks
    them (a new task head on a student of a masked-LM teacher)."""
    source = teacher.state_dict()
    target = student.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            match = _LAYER.match(name)
            key = name if match is None else f"{match[1]}{teacher_layers[int(match[2])] - 1}{match[3]}"
            if key not in source and name.startswith(skip_missing):
                continue
            if key not in source or source[key].shape != tensor.shape:
                raise ValueError(f"cannot initialise student weight {name} from teacher weight {key}")
            tensor.copy_(source[key])
