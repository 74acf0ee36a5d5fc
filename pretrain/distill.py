"""The module DeepSpeed trains: the student, its learned projections, and the weighted objectives.

Projections live in this module (not beside it) so that DeepSpeed's optimizer, ZeRO partitioning
and checkpoints treat them like any other trained weight; the export strips them. `forward` returns
the total loss and each weighted objective separately, for logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from kdlib.objectives import ObjectiveConfig, evaluate_objective
from pretrain.config import ATTENTION_LOSSES, EMBEDDING_LOSSES, HIDDEN_LOSSES, OUTPUT_LOSSES
from pretrain.internals import AttentionViews, capture_qkv

PROJECTION_FOR = {"hidden_mse": "hidden", "distilbert_cosine": "hidden", "embedding_mse": "embeddings"}


class LazyInputs(Mapping):
    """Loss inputs computed only when a loss asks for them (attention maps are (B, H, T, T))."""

    def __init__(self, makers: dict[str, Callable[[], Any]]):
        self._makers, self._values = makers, {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            self._values[name] = self._makers[name]()
        return self._values[name]

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


@dataclass
class Internals:
    """One model's intermediate outputs for a batch: hidden states (0 = embeddings) and attention views."""

    hidden: Optional[tuple] = None
    views: Optional[AttentionViews] = None


def needs(objectives: list[ObjectiveConfig]) -> tuple[bool, bool]:
    """(hidden states needed, Q/K/V needed) by these objectives."""
    names = {o.name for o in objectives}
    return bool(names & set(HIDDEN_LOSSES + EMBEDDING_LOSSES)), bool(names & set(ATTENTION_LOSSES))


def run_with_internals(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, hidden: bool, qkv: bool,
                       heads: int):
    """Forward pass returning (model output, Internals); used for student and online teacher alike."""
    with capture_qkv(model, enabled=qkv) as store:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
    views = AttentionViews(store, heads, attention_mask) if qkv else None
    return out, Internals(hidden=out.hidden_states if hidden else None, views=views)


class DistillModule(nn.Module):
    """student + projections; forward(batch, teacher) -> (total loss, {objective name: weighted loss})."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict, objectives: list[ObjectiveConfig],
                 pairs: list[tuple[int, int]]):
        super().__init__()
        self.student = student
        self.projections = projections
        self.objectives = objectives
        self.pairs = pairs
        self.heads = student.config.num_attention_heads
        self.want_hidden, self.want_qkv = needs(objectives)

    def forward(self, batch: dict, teacher: Optional[Internals] = None, step: int = 0, total_steps: int = 1):
        mask = batch["attention_mask"]
        out, mine = run_with_internals(self.student, batch["input_ids"], mask, hidden=self.want_hidden,
                                       qkv=self.want_qkv, heads=self.heads)
        logits = out.logits.float()  # (B, T, V); losses in fp32 whatever the engine's precision
        parts: dict[str, Tensor] = {}
        for obj in self.objectives:
            if obj.name in OUTPUT_LOSSES:
                parts[obj.name] = evaluate_objective(obj, self._output_inputs(obj, logits, batch), step, total_steps)
            elif obj.name in EMBEDDING_LOSSES:
                parts[obj.name] = evaluate_objective(obj, self._hidden_inputs(obj, mine, teacher, mask, 0, 0, "embeddings"),
                                                     step, total_steps)
            else:
                parts[obj.name] = self._over_pairs(obj, mine, teacher, mask, step, total_steps)
        total = torch.stack(list(parts.values())).sum()
        return total, parts

    @staticmethod
    def _output_inputs(obj, logits: Tensor, batch: dict) -> LazyInputs:
        """mlm_ce sees only the masked rows (M, V): the same mean, without a second full-vocabulary
        log-softmax over every position (the step's largest tensor, (B, T, V))."""
        if obj.name == "mlm_ce":
            picked = batch["mlm_labels"] != obj.params.get("ignore_index", -100)
            return LazyInputs({"student_logits": lambda: logits[picked], "labels": lambda: batch["mlm_labels"][picked],
                               "mask": lambda: None})
        return LazyInputs({"student_logits": lambda: logits, "mask": lambda: batch["attention_mask"],
                           "topk_ids": lambda: batch["topk_ids"], "topk_logits": lambda: batch["topk_logits"],
                           "teacher_lse": lambda: batch["teacher_lse"]})

    def _over_pairs(self, obj, mine: Internals, teacher: Internals, mask, step, total_steps) -> Tensor:
        """Mean over mapped (teacher, student) layer pairs; attention losses skip layer 0 (embeddings)."""
        values = []
        for t_layer, s_layer in self.pairs:
            if obj.name in HIDDEN_LOSSES:
                inputs = self._hidden_inputs(obj, mine, teacher, mask, t_layer, s_layer, "hidden")
            elif t_layer > 0 and s_layer > 0:
                inputs = self._attention_inputs(mine.views, teacher.views, mask, t_layer, s_layer)
            else:
                continue
            values.append(evaluate_objective(obj, inputs, step, total_steps))
        return torch.stack(values).mean()

    def _hidden_inputs(self, obj, mine: Internals, teacher: Internals, mask, t_layer: int, s_layer: int, prefix: str):
        projection = self.projections[PROJECTION_FOR[obj.name]] if PROJECTION_FOR[obj.name] in self.projections else None
        s, t = mine.hidden[s_layer], teacher.hidden[t_layer]
        return LazyInputs({f"student_{prefix}": lambda: s, f"teacher_{prefix}": lambda: t, "mask": lambda: mask,
                           "projection": lambda: projection})

    @staticmethod
    def _attention_inputs(mine: AttentionViews, teacher: AttentionViews, mask, t: int, s: int) -> LazyInputs:
        return LazyInputs({
            "student_attention_scores": lambda: mine.scores(s), "teacher_attention_scores": lambda: teacher.scores(t),
            "student_attention_probs": lambda: mine.probs(s), "teacher_attention_probs": lambda: teacher.probs(t),
            "student_values": lambda: mine.values(s), "teacher_values": lambda: teacher.values(t),
            "student_query": lambda: mine.query(s), "teacher_query": lambda: teacher.query(t),
            "student_key": lambda: mine.key(s), "teacher_key": lambda: teacher.key(t),
            "student_value": lambda: mine.value(s), "teacher_value": lambda: teacher.value(t),
            "mask": lambda: mask})
