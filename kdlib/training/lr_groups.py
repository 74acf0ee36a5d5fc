"""AdamW parameter groups with layer-wise learning-rate decay (ELECTRA / BAM fine-tuning practice).

Lower layers hold general features that fine-tuning should move less. Depth d of a BERT-family
parameter (see `layer_depth`): embeddings 0, transformer layer i (0-based) i + 1, everything above the
last layer (pooler, classifier, MLM head, the distillation module's projections) L + 1. Its peak rate is

    lr_d = learning_rate * layer_decay ** (L + 1 - d)

so heads train at `learning_rate`, the top layer at lr * decay, the embeddings at lr * decay ** (L + 1).
(ELECTRA's `_get_layer_lrs` gives the task head depth L + 2 while the top layer stays at L, so its
layers are one decay step lower than here: decay ** (L + 2 - d); we keep the depths contiguous.)
Weight decay applies to matrices only (ndim >= 2), as kdlib.training.deepspeed_engine.initialize does.

DeepSpeed's WarmupLR / WarmupDecayLR set every group's lr to the scalar warmup_min_lr/warmup_max_lr
of the JSON config, which erases per-group rates; given one value per group (a list) they schedule
each group separately (deepspeed.runtime.lr_schedules._format_param). `scheduler_with_group_lrs`
rewrites the scheduler block that way. WarmupCosineLR multiplies each group's own lr by a ratio and
needs no change.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Optional

from torch import nn

# BERT, RoBERTa, ELECTRA, DeBERTa: `encoder.layer.<i>.`; DistilBERT: `transformer.layer.<i>.`
_LAYER = re.compile(r"(?:^|\.)(?:encoder|transformer)\.layer\.(\d+)\.")
# `embeddings.` (BERT family) and ELECTRA's `embeddings_project.` (embedding -> hidden width)
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings(?:_project)?\.")
# WarmupLR / WarmupDecayLR keys that are broadcast to every group when scalar
_PER_GROUP_KEYS = ("warmup_min_lr", "warmup_max_lr")


def layer_depth(param_name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for `...encoder.layer.<i>....`, num_layers + 1 for anything else.

    Any prefix is allowed (`student.bert.encoder.layer.0...` in kdlib.training.module.DistillModule,
    `peer.` for its peer student). A layer index >= num_layers means num_layers is not this model's
    depth, which would give wrong rates silently: ValueError. ALBERT's shared layer groups and
    decoder-only models have no such names and land at num_layers + 1 (no decay).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers: expected an integer >= 0, got {num_layers!r}")
    found = _LAYER.search(param_name)
    if found:
        index = int(found.group(1))
        if index >= num_layers:
            raise ValueError(f"num_layers: parameter {param_name!r} is in layer {index}, so the model has more "
                             f"than num_layers={num_layers} layers")
        return index + 1
    if _EMBEDDINGS.search(param_name):
        return 0
    return num_layers + 1


def _check_rate(name: str, value: float, *, low: float, low_open: bool, high: float = math.inf) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else "")
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], *, learning_rate: float,
                 weight_decay: float, layer_decay: float = 1.0, num_layers: int, by_depth: bool = False,
                 rates: Optional[dict[str, float]] = None) -> list[dict]:
    """Optimizer param groups {"params", "lr", "weight_decay"}; parameters with requires_grad=False are left out.

    layer_decay == 1: exactly kdlib.training.deepspeed_engine.initialize's two groups (matrices with weight decay, then
    biases/LayerNorm without), same members in the same order, both present even if one is empty,
    plus "lr": learning_rate (what AdamW's default fills in anyway), so existing runs are unchanged.
    layer_decay < 1: one group per (depth, decay / no decay) that has parameters, by depth from the
    embeddings up, decay before no decay; parameters keep their named_parameters order within a group.
    The "lr" of a group is its peak rate; see `scheduler_with_group_lrs` for DeepSpeed's schedulers.
    by_depth: the per-depth groups whatever the decay, each with its "depth" (kdlib.training.progressive scales rates
    by depth while training).
    rates: {name regex: peak rate}: parameters whose name matches go, in that order, into one group per
    pattern at that rate without weight decay, after all the others (AdaShare's policy logits); an empty
    or absent mapping changes nothing.
    """
    _check_rate("learning_rate", learning_rate, low=0.0, low_open=True)
    _check_rate("weight_decay", weight_decay, low=0.0, low_open=False)
    _check_rate("layer_decay", layer_decay, low=0.0, low_open=True, high=1.0)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers: expected an integer >= 0, got {num_layers!r}")
    trained = [(name, p) for name, p in named_parameters if p.requires_grad]
    special: list[dict] = []
    for pattern, rate in (rates or {}).items():
        _check_rate(f"rates[{pattern!r}]", rate, low=0.0, low_open=True)
        members = [p for name, p in trained if re.search(pattern, name)]
        trained = [(name, p) for name, p in trained if not re.search(pattern, name)]
        if members:
            special.append({"params": members, "lr": float(rate), "weight_decay": 0.0,
                            **({"depth": num_layers + 1} if by_depth else {})})
    return _groups(trained, learning_rate, weight_decay, layer_decay, num_layers, by_depth) + special


def _groups(trained: list, learning_rate: float, weight_decay: float, layer_decay: float, num_layers: int,
            by_depth: bool) -> list[dict]:
    if layer_decay == 1.0 and not by_depth:
        for name, _ in trained:
            layer_depth(name, num_layers)  # a wrong num_layers is an error whatever the decay
        decay = [p for _, p in trained if p.ndim >= 2]
        no_decay = [p for _, p in trained if p.ndim < 2]  # biases and LayerNorm weights
        return [{"params": decay, "lr": float(learning_rate), "weight_decay": float(weight_decay)},
                {"params": no_decay, "lr": float(learning_rate), "weight_decay": 0.0}]
    buckets: dict[tuple[int, bool], list] = {}
    for name, p in trained:
        buckets.setdefault((layer_depth(name, num_layers), p.ndim >= 2), []).append(p)
    groups = []
    for depth in range(num_layers + 2):
        for decays in (True, False):
            members = buckets.get((depth, decays))
            if members:
                groups.append({"params": members,
                               "lr": float(learning_rate) * float(layer_decay) ** (num_layers + 1 - depth),
                               "weight_decay": float(weight_decay) if decays else 0.0,
                               **({"depth": depth} if by_depth else {})})
    return groups


def scheduler_with_group_lrs(scheduler: dict, groups: list[dict], learning_rate: float) -> dict:
    """A copy of a DeepSpeed JSON `scheduler` block that keeps each group's rate relative to learning_rate.

    WarmupLR / WarmupDecayLR: scalar warmup_min_lr and warmup_max_lr s become [s * g["lr"] / learning_rate
    for each group g], so group g warms up to and decays from its own peak. WarmupCosineLR already scales
    each group's own lr: unchanged. When every group's lr equals learning_rate the block is returned
    unchanged (byte-identical DeepSpeed config for runs without layer decay). Other schedulers with
    unequal group rates: ValueError, rather than a schedule that silently flattens the decay.
    """
    _check_rate("learning_rate", learning_rate, low=0.0, low_open=True)
    out = copy.deepcopy(scheduler)
    scales = [float(g["lr"]) / float(learning_rate) for g in groups]
    if all(s == 1.0 for s in scales):
        return out
    kind, params = out.get("type"), out.setdefault("params", {})
    if kind == "WarmupCosineLR":
        return out
    if kind not in ("WarmupLR", "WarmupDecayLR"):
        raise ValueError(f"scheduler.type: per-group learning rates (layer_decay < 1) need WarmupLR, WarmupDecayLR "
                         f"or WarmupCosineLR, got {kind!r}")
    for key in _PER_GROUP_KEYS:
        value = params.get(key, 0.0 if key == "warmup_min_lr" else None)
        if value is None:  # WarmupDecayLR's own default is 0.001, not the groups' rates: refuse to guess
            raise ValueError(f"scheduler.params.{key}: expected a number to scale per group, got none")
        if isinstance(value, (list, tuple)):
            raise ValueError(f"scheduler.params.{key}: expected one number (scaled per group here), got a list")
        params[key] = [float(value) * s for s in scales]
    return out


__all__ = ["layer_depth", "param_groups", "scheduler_with_group_lrs"]
