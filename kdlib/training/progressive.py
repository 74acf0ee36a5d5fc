"""MobileBERT's progressive knowledge transfer (Sun et al. 2020, section 3.5): the student's layers learn
one at a time, bottom up, each from the layer-wise losses at its own output, before all of them train
together.

Stage l (1-based; optimizer steps [(l - 1) n, l n) for n = steps_per_layer) trains student layer l on
the layer-wise objectives (scopes pair / attention_pair / embedding) evaluated at the sites whose student
layer is l; the embedding-level site (student layer 0) belongs to stage 1. Every other term is 0 in the
stages. Parameter depth d is kdlib.training.lr_groups.layer_depth's (0 embeddings, i + 1 transformer layer i,
L + 1 everything above):
  * d == l trains at the scheduled rate, and so do the embeddings (d == 0) in stage 1, which they feed;
  * d < l (the layers below, and the embeddings after stage 1) at the rate times `lower_layers_lr`: 0, the paper's
    freezing, also drops their gradients, so neither AdamW's moments nor the global gradient-norm clip
    see them; a small factor is the paper's softened variant;
  * l < d <= L get no gradient from these terms and are held at rate 0, so weight decay leaves them as
    initialised until their stage;
  * d == L + 1 (heads, learned width projections) trains throughout: projections serve every stage.
After L stages comes the joint phase: every objective at every site, every parameter at its scheduled
rate (the paper's pre-training distillation that follows the transfer).

The stage is a pure function of the optimizer step, so a resumed run trains exactly as one that was
never stopped. Rates are applied on top of DeepSpeed's scheduler: it writes every group's rate after
each optimizer step, and `apply_rates` scales them before the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kdlib.training.lr_groups import layer_depth
from kdlib.training.objective_plan import ObjectivePlan
from kdlib.training.providers import ATTENTION_PAIR, EMBEDDING, PAIR, Site

LAYER_WISE = (PAIR, ATTENTION_PAIR, EMBEDDING)  # scopes whose sites belong to one student layer


@dataclass
class ProgressiveConfig:
    """Progressive layer-by-layer transfer before joint training (MobileBERT)."""

    steps_per_layer: int  # optimizer steps each student layer trains alone, lowest first; the joint phase follows
    lower_layers_lr: float = 0.0  # rate factor of the layers below the one in training (0: frozen, as in the paper)

    def __post_init__(self) -> None:
        if isinstance(self.steps_per_layer, bool) or not isinstance(self.steps_per_layer, int) \
                or self.steps_per_layer < 1:
            raise ValueError(f"steps_per_layer: expected a positive integer, got {self.steps_per_layer!r}")
        if isinstance(self.lower_layers_lr, bool) or not isinstance(self.lower_layers_lr, (int, float)) \
                or not 0.0 <= self.lower_layers_lr <= 1.0:
            raise ValueError(f"lower_layers_lr: expected a number in [0, 1], got {self.lower_layers_lr!r}")
        self.lower_layers_lr = float(self.lower_layers_lr)


def coverage_problem(plans: list[ObjectivePlan], num_layers: int) -> Optional[str]:
    """None when every student layer 1..L has a layer-wise objective site (a stage with no loss would train
    nothing and has no gradient to step on), else a sentence naming the layers without one."""
    taught = {site.student_layer for plan in plans if plan.scope in LAYER_WISE for site in plan.sites}
    missing = [layer for layer in range(1, num_layers + 1) if layer not in taught]
    if not missing:
        return None
    return (f"progressive transfer trains one student layer at a time on the layer-wise objectives "
            f"(hidden_mse, attention_kl, ...) at that layer, but student layers {missing} have none; add such an "
            f"objective and a layer_map that maps every student layer (e.g. layer_map: {{name: uniform}})")


class ProgressiveTransfer:
    """The stage at a step, the sites an objective is evaluated at, the rate of each parameter group, and the
    gradient gates of frozen parameters."""

    def __init__(self, config: ProgressiveConfig, num_layers: int):
        self.config, self.num_layers = config, num_layers
        self.current: Optional[int] = None  # the layer of the micro-batch being computed (read by the gates)

    @property
    def stage_steps(self) -> int:
        return self.config.steps_per_layer * self.num_layers

    def layer_at(self, step: int) -> Optional[int]:
        """The student layer (1-based) training alone at optimizer step `step` (0-based), None in the joint phase."""
        stage = step // self.config.steps_per_layer
        return stage + 1 if stage < self.num_layers else None

    def begin(self, step: int) -> Optional[int]:
        self.current = self.layer_at(step)
        return self.current

    def sites(self, plan: ObjectivePlan, layer: Optional[int]) -> list[Site]:
        """Where `plan` is evaluated with `layer` in training: all its sites in the joint phase; in a stage, its
        sites at that student layer (layer 0 with layer 1) if it is layer-wise, else none."""
        if layer is None:
            return list(plan.sites)
        if plan.scope not in LAYER_WISE:
            return []
        return [s for s in plan.sites if s.student_layer == layer or (layer == 1 and s.student_layer == 0)]

    @staticmethod
    def trains(depth: int, layer: Optional[int]) -> bool:
        """Depth `depth` is the part in training with `layer` (every depth in the joint phase)."""
        return layer is None or depth == layer or (layer == 1 and depth == 0)

    def below(self, depth: int, layer: Optional[int]) -> bool:
        """Depth `depth` lies under the part in training (frozen, or at the softened rate)."""
        return not self.trains(depth, layer) and depth < layer

    def rate_factor(self, depth: int, layer: Optional[int]) -> float:
        if self.trains(depth, layer) or depth > self.num_layers:
            return 1.0
        return self.config.lower_layers_lr if self.below(depth, layer) else 0.0

    def apply_rates(self, param_groups: list[dict], step: int) -> float:
        """Scale each group's scheduled rate for `step`; returns the rate of the layer in training (the
        schedule's own value). Groups must carry "depth" (kdlib.training.lr_groups.param_groups(by_depth=True))."""
        layer = self.layer_at(step)
        scheduled = max(float(g["lr"]) for g in param_groups)
        for group in param_groups:
            group["lr"] = float(group["lr"]) * self.rate_factor(group["depth"], layer)
        return scheduled

    def gate_gradients(self, module: nn.Module, num_layers: int) -> None:
        """Drop the gradients of frozen parameters (lower_layers_lr 0, depth below the layer in training) before
        they are accumulated, so the optimizer and the gradient clip see only what trains."""
        if self.config.lower_layers_lr > 0:
            return
        for name, param in module.named_parameters():
            if param.requires_grad:
                depth = layer_depth(name, num_layers)
                if depth <= num_layers:
                    param.register_hook(self._gate(depth))

    def _gate(self, depth: int):
        def gate(grad: torch.Tensor) -> torch.Tensor:
            if self.below(depth, self.current):
                return torch.zeros_like(grad)
            return grad

        return gate


__all__ = ["LAYER_WISE", "ProgressiveConfig", "ProgressiveTransfer", "coverage_problem"]
