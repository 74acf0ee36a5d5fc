"""Build the student: a masked-LM of the teacher's config family (or a MobileBERT-style bottleneck
student), or for a causal_lm teacher a causal LM (GPT-2, Llama-style), optionally initialised from the
teacher.

The student config is the teacher's config.json with the shape fields replaced (layers, width,
heads, feed-forward width), or for architecture=bottleneck a MobileBertConfig derived from it
(kdlib.students.bottleneck), so tokenizer, vocabulary, position table and activation all match the teacher.
With init=every_other / explicit, the student copies the teacher's embeddings, its masked-LM head
and the chosen transformer layers (DistilBERT, Sanh et al. 2019); init=svd copies them compressed
into a narrower width (kdlib.students.width); init=embeddings (bottleneck) copies the embeddings and
the MLM head. Nothing here knows about DeepSpeed or ranks.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from kdlib.runtime.models import ModelConfig, load_model
from kdlib.schemas import StudentConfig
from kdlib.students.bottleneck import register_head_parameters
from kdlib.students.shape import init_from_teacher, needs_teacher, student_config


def student_task(teacher_cfg: ModelConfig) -> str:
    """The head general distillation trains: next-token prediction under a causal teacher, else masked LM."""
    return "causal_lm" if teacher_cfg.task == "causal_lm" else "masked_lm"


def student_class(teacher_cfg: ModelConfig):
    """The transformers auto class the student is built, exported and loaded with."""
    return transformers.AutoModelForCausalLM if student_task(teacher_cfg) == "causal_lm" else \
        transformers.AutoModelForMaskedLM


def build_student(teacher_cfg: ModelConfig, teacher_config, student: StudentConfig, seed: int) -> nn.Module:
    """A fresh student (seeded), with teacher weights copied in when the config asks for it."""
    torch.manual_seed(seed)
    model = student_class(teacher_cfg).from_config(student_config(teacher_config, student))
    if needs_teacher(student):
        teacher = load_model(ModelConfig(path=teacher_cfg.path, task=student_task(teacher_cfg),
                                         trust_remote_code=teacher_cfg.trust_remote_code))
        init_from_teacher(model, teacher, student)
        del teacher
    if student.architecture == "bottleneck":
        register_head_parameters(model)  # for ZeRO-3
    return model
