"""Build the student: a masked-LM of the teacher's config family (or a MobileBERT-style bottleneck
student), optionally initialised from the teacher.

The student config is the teacher's config.json with the shape fields replaced (layers, width,
heads, feed-forward width), or for architecture=bottleneck a MobileBertConfig derived from it
(kdlib.bottleneck), so tokenizer, vocabulary, position table and activation all match the teacher.
With init=every_other / explicit, the student copies the teacher's embeddings, its masked-LM head
and the chosen transformer layers (DistilBERT, Sanh et al. 2019); init=svd copies them compressed
into a narrower width (kdlib.student_width); init=embeddings (bottleneck) copies the embeddings and
the MLM head. Nothing here knows about DeepSpeed or ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.models import ModelConfig, load_model
from kdlib.schemas import StudentConfig
from kdlib.student_shape import init_from_teacher, needs_teacher, student_config


def build_student(teacher_cfg: ModelConfig, teacher_config, student: StudentConfig, seed: int) -> nn.Module:
    """A fresh masked-LM student (seeded), with teacher weights copied in when the config asks for it."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(student_config(teacher_config, student))
    if needs_teacher(student):
        teacher = load_model(ModelConfig(path=teacher_cfg.path, task="masked_lm",
                                         trust_remote_code=teacher_cfg.trust_remote_code))
        init_from_teacher(model, teacher, student)
        del teacher
    if student.architecture == "bottleneck":
        from kdlib.bottleneck import register_head_parameters

        register_head_parameters(model)  # for ZeRO-3
    return model
