"""A student built from the teacher's config: the teacher's config.json with the shape fields replaced
(or, for architecture=bottleneck, a MobileBERT config derived from it), and teacher weights copied in:
DistilBERT's every-other layers, an explicit list, or (init=svd) those layers compressed into a
narrower width (kdlib.student_width).

Shared by every stage that builds a student from a teacher: pretrain (masked-LM students) and
finetune (classifier students, BERT-PKD's skip initialisation). Nothing here knows about heads: the
caller builds the model class it needs from `student_config` and calls `copy_teacher_layers`
(pretrain: `init_from_teacher`, which also handles a bottleneck student's embeddings).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kdlib.schemas import StudentConfig, init_layer_map

_LAYER = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")


def student_config(teacher_config, student: StudentConfig):
    """A copy of the teacher's transformers config with the student's shape (a MobileBertConfig for bottleneck)."""
    if student.architecture == "bottleneck":
        from kdlib.bottleneck import bottleneck_config

        return bottleneck_config(teacher_config, student)
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


def _same_shape(student: nn.Module, teacher: nn.Module) -> bool:
    a, b = student.config, teacher.config
    return a.hidden_size == b.hidden_size and a.intermediate_size == b.intermediate_size


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, teacher_layers: list[int],
                        skip_missing: tuple[str, ...] = ()) -> None:
    """Student layer i <- teacher layer teacher_layers[i] (1-based); every non-layer weight copied as is.
    Weights whose name starts with one of `skip_missing` keep their own values when the teacher lacks
    them (a new task head on a student of a masked-LM teacher). A student narrower than the teacher (or with
    fewer FFN units) gets the weights compressed (init=svd, kdlib.student_width); at the teacher's width and
    feed-forward size that is exactly this copy."""
    if not _same_shape(student, teacher):
        from kdlib.student_width import compress_teacher

        compress_teacher(student, teacher, teacher_layers, skip_missing)
        return
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


def init_from_teacher(student: nn.Module, teacher: nn.Module, shape: StudentConfig,
                      skip_missing: tuple[str, ...] = ()) -> None:
    """Whatever `shape.init` copies from the teacher into a freshly built student (nothing for init=random)."""
    if shape.init == "embeddings":
        from kdlib.bottleneck import copy_teacher_embeddings

        copy_teacher_embeddings(student, teacher)
        return
    layers = init_layer_map(shape, teacher.config.num_hidden_layers)
    if layers:
        copy_teacher_layers(student, teacher, layers, skip_missing)


def needs_teacher(shape: StudentConfig) -> bool:
    """Whether building this student reads the teacher's weights."""
    return shape.init != "random"
