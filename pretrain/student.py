"""Build the student: a masked-LM of the teacher's config family, optionally initialised from teacher layers.

The student config is the teacher's config.json with the shape fields replaced (layers, width,
heads, feed-forward width), so tokenizer, vocabulary, position table and activation all match the
teacher. With init=every_other / explicit, the student copies the teacher's embeddings, its
masked-LM head and the chosen transformer layers (DistilBERT, Sanh et al. 2019). Nothing here knows
about DeepSpeed or ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.models import ModelConfig, load_model
from kdlib.schemas import StudentConfig, init_layer_map
from kdlib.student_shape import copy_teacher_layers, student_config


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
