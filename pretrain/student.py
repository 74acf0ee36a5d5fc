"""Build the student: a masked-LM of the teacher's config family, optionally initialised from teacher layers.

The student config is the teacher's config.json with the shape fields replaced (layers, width,
heads, feed-forward width), so tokenizer, vocabulary, position table and activation all match the
teacher. With init=every_other / explicit, the student copies the teacher's embeddings, its
masked-LM head and the chosen transformer layers (DistilBERT, Sanh et al. 2019). Nothing here knows
about DeepSpeed or ranks.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kdlib.models import ModelConfig, load_model
from kdlib.schemas import StudentConfig, init_layer_map

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


def build_student(teacher_cfg: ModelConfig, teacher_config, student: StudentConfig, seed: int) -> nn.Module:
    """A fresh masked-LM student (seeded), with teacher layers copied in when the config asks for it."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(student_config(teacher_config, student))
    layers = init_layer_map(student, teacher_config.num_hidden_layers)
    if layers:
        teacher = load_model(ModelConfig(path=teacher_cfg.path, task="masked_lm",
                                         trust_remote_code=teacher_cfg.trust_remote_code))
        copy_teacher_layers(model, teacher, layers)
        del teacher
    return model


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, teacher_layers: list[int]) -> None:
    """Student layer i <- teacher layer teacher_layers[i] (1-based); every non-layer weight copied as is."""
    source = teacher.state_dict()
    target = student.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            match = _LAYER.match(name)
            key = name if match is None else f"{match[1]}{teacher_layers[int(match[2])] - 1}{match[3]}"
            if key not in source or source[key].shape != tensor.shape:
                raise ValueError(f"cannot initialise student weight {name} from teacher weight {key}")
            tensor.copy_(source[key])
