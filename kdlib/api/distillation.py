"""`Distillation(objectives, teacher=...)`: the weighted objectives of a stage config as one loss object for any
training script. It takes a student's outputs and a batch and returns the total and each weighted term.

Built once, it runs every check the stages run before training (kdlib.api.offer: each objective's inputs against
what the transfer set caches and whether a teacher runs online, layer maps, fingerprints). At each call the
student's and the teacher's outputs become the losses' inputs through the stages' own provider table
(kdlib.training.providers), and each term is evaluated as `DistillModule.forward` evaluates it: the same
`gather`, `evaluate_objective`, and one chunked pass for the output losses over factored logits.
It is an nn.Module because it may own weights that train with the student: the learned width projections
(TinyBERT's W_h), seeded as the stages seed them. The teacher is held, frozen, outside its parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from kdlib.api.offer import SOURCE, plan
from kdlib.errors import fail_field
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.training.deepspeed_engine import EngineConfig
from kdlib.training.deepspeed_engine import logit_chunk_size as chunk_size_for
from kdlib.training.internals import ModelView, run_model
from kdlib.training.module import make_projections, objective_terms
from kdlib.training.objective_plan import cached_reads, projection_groups, reads
from kdlib.training.providers import StepInputs


class Terms(NamedTuple):
    """The training loss and each objective's weighted value (`total, terms = distillation(outputs, batch)`)."""

    total: Tensor
    terms: dict[str, Tensor]


class Distillation(nn.Module):
    """objectives: ObjectiveConfigs or mappings ({"name": "kd_topk", "weight": 1.0, "params": {...}}), as in a
    stage config. teacher: None (cached targets only), a model, or a model folder / `package:` reference, run
    frozen on each batch for the inputs no cache holds. student: the student model (or its transformers config):
    its shape decides layer pairs, head checks and projections. transfer_set: a TransferSet or its folder, whose
    manifest says which targets are cached (or `cached=`: the batch keys your own batches hold)."""

    def __init__(self, objectives: Sequence[Union[ObjectiveConfig, dict]], teacher: Union[None, str, nn.Module] = None,
                 *, student, transfer_set=None, cached: Optional[Sequence[str]] = None, layer_map=None,
                 teacher_task: Optional[str] = None, token_level: Optional[bool] = None, seed: int = 0,
                 chunked_logits: str = "auto", logit_chunk_size: int = 256, source: str = SOURCE):
        super().__init__()
        planned = plan(objectives, student=student, teacher=teacher, transfer_set=transfer_set, cached=cached,
                       layer_map=layer_map, teacher_task=teacher_task, token_level=token_level, source=source)
        self.objectives: list[ObjectiveConfig] = planned.objectives
        self.names = [o.name for o in self.objectives]
        self.offer, self.plans, self.manifest = planned.offer, planned.plans, planned.manifest
        student_config = planned.student_config
        width = student_config.hidden_size
        self.projections = make_projections(width, planned.teacher.width or width, projection_groups(self.plans), seed)
        wants, teacher_wants = reads(self.plans, "student"), reads(self.plans, "teacher")
        self.want_hidden, self.want_qkv = "hidden" in wants, "qkv" in wants
        self.student_heads = student_config.num_attention_heads
        self.teacher_heads = planned.teacher.heads
        self._teacher_wants = ("hidden" in teacher_wants, "qkv" in teacher_wants, "logits" in teacher_wants)
        self.__dict__["teacher"] = planned.teacher.model  # frozen, not a submodule: never trained, saved or synced
        self.reads = sorted(cached_reads(self.plans, self.offer))  # the batch keys the objectives read
        try:
            engine = EngineConfig(zero_stage=0, chunked_logits=chunked_logits, logit_chunk_size=logit_chunk_size)
            self.chunk_size = chunk_size_for(engine, self.objectives)
        except ValueError as err:
            fail_field(source, err.args[0].split(":")[0], err.args[0].split(": ", 1)[-1])
        self.chunked_logits = chunked_logits

    # ------------------------------------------------------------ what the student's forward must give
    @property
    def student_kwargs(self) -> dict:
        """Keyword arguments the student's forward needs for these objectives (`output_hidden_states`)."""
        return {"output_hidden_states": True} if self.want_hidden else {}

    def dense_logits_only(self) -> None:
        """Use the student's dense logits (ZeRO-3 partitions the output projection the chunked losses read);
        ValueError when chunked_logits was "on"."""
        if self.chunk_size and self.chunked_logits == "on":
            raise ValueError("chunked_logits: on, but ZeRO-3 partitions the output projection's weight, which the "
                             "chunked losses read (set auto or off)")
        self.chunk_size = 0

    def run_student(self, model: nn.Module, batch: dict) -> ModelView:
        """The student's forward with what the objectives read captured (hidden states, Q/K/V by hooks) and, where
        the head allows, its logits left factored for the chunked output losses; pass the result as `outputs`."""
        return run_model(model, batch["input_ids"], batch["attention_mask"], hidden=self.want_hidden,
                         qkv=self.want_qkv, heads=self.student_heads, chunk_size=self.chunk_size)

    def teacher_outputs(self, batch: dict) -> Optional[ModelView]:
        """The online teacher's view of this batch (None without one): frozen, eval mode, no gradients."""
        teacher = self.__dict__["teacher"]
        if teacher is None:
            return None
        device = batch["input_ids"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        hidden, qkv, logits = self._teacher_wants
        with torch.no_grad():
            return run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=hidden, qkv=qkv,
                             heads=self.teacher_heads, logits=logits)

    def _view(self, outputs: Any, batch: dict) -> ModelView:
        if isinstance(outputs, ModelView):
            return outputs
        if self.want_qkv:
            raise ValueError("outputs: these objectives read the student's attention (Q/K/V), which its outputs do not "
                             "hold; pass distillation.run_student(student, batch), which captures them")
        if self.want_hidden and getattr(outputs, "hidden_states", None) is None:
            raise ValueError("outputs: these objectives read the student's hidden states; call the student with "
                             "output_hidden_states=True (distillation.student_kwargs)")
        if getattr(outputs, "logits", None) is None:
            raise ValueError(f"outputs: expected a transformers model output with logits, got {type(outputs).__name__}")
        return ModelView(outputs, None, self.student_heads, batch["attention_mask"])

    # ------------------------------------------------------------ the loss
    def forward(self, outputs: Any, batch: dict, *, teacher_outputs: Optional[ModelView] = None, step: int = 0,
                total_steps: int = 1) -> Terms:
        """(total, {objective: weighted value}) for the student's `outputs` (a transformers output, or
        `run_student`'s view) on `batch` (a collated transfer-set batch: input_ids, attention_mask and the cached
        targets); `step` / `total_steps` drive weight and temperature schedules."""
        mine = self._view(outputs, batch)
        teacher = teacher_outputs if teacher_outputs is not None else self.teacher_outputs(batch)
        x = StepInputs(batch, self.offer, student=mine, teacher=teacher, projections=self.projections, step=step,
                       total_steps=total_steps)
        total, parts = objective_terms(self.objectives, self.plans, x, mine.factored, step, total_steps)
        return Terms(total, {name: parts[name] for name in self.names})

