"""`python -m pretrain`'s optimizer and learning-rate schedule in plain torch, for a trainer that is not ours.

The stages pass DeepSpeed torch's AdamW over kdlib.training.lr_groups' parameter groups and schedule it with
DeepSpeed's WarmupDecayLR as `deepspeed_config` writes it: the first two optimizer steps at
learning_rate / (warmup_steps + 1), then linear warmup to learning_rate over max(2, warmup_steps) steps, then linear
decay back to that minimum at decay_steps (default: the run's steps; WarmupDecayLR decays the warmup's increase,
so the rate ends at warmup_min_lr, not at 0). transformers' "linear" schedule starts at 0 and warms up
from the first step, so over the same steps its rates differ; `WarmupDecay` computes DeepSpeed's rates, with
the same arithmetic, from the same JSON block, without importing DeepSpeed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlib.training.deepspeed_engine import EngineConfig, OptimConfig, deepspeed_config
from kdlib.training.lr_groups import param_groups, scheduler_with_group_lrs


def adamw(module: nn.Module, optim: OptimConfig, num_layers: int) -> torch.optim.AdamW:
    """torch AdamW over the stages' parameter groups (weight decay on matrices only; layer-wise decay if set), as
    kdlib.training.deepspeed_engine.initialize builds it."""
    if optim.implementation != "torch":
        raise ValueError("implementation: only the torch AdamW runs outside DeepSpeed (got 'deepspeed')")
    groups = param_groups(module.named_parameters(), learning_rate=optim.learning_rate,
                          weight_decay=optim.weight_decay, layer_decay=optim.layer_decay, num_layers=num_layers)
    return torch.optim.AdamW(groups, lr=optim.learning_rate, betas=tuple(optim.betas), eps=optim.eps)


class WarmupDecay(torch.optim.lr_scheduler.LRScheduler):
    """DeepSpeed's WarmupDecayLR (linear warmup) with the parameters `deepspeed_config` gives it, per group."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int,
                 last_epoch: int = -1):
        block = deepspeed_config(EngineConfig(optim=optim), 1, total_steps)["scheduler"]
        block = scheduler_with_group_lrs(block, optimizer.param_groups, optim.learning_rate)
        params = block["params"]
        n = len(optimizer.param_groups)
        self.min_lrs = _per_group(params["warmup_min_lr"], n)
        max_lrs = _per_group(params["warmup_max_lr"], n)
        self.delta_lrs = [big - small for big, small in zip(max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, params["warmup_num_steps"])  # as DeepSpeed's WarmupLR
        self.total_num_steps = params["total_num_steps"]
        super().__init__(optimizer, last_epoch)

    def gamma(self, iteration: int) -> float:
        """DeepSpeed's `_get_gamma` at its `last_batch_iteration`."""
        if iteration < self.warmup_num_steps:
            return iteration / self.warmup_num_steps
        decay = float(max(1.0, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, float(self.total_num_steps - iteration) / decay)

    def get_lr(self) -> list[float]:
        # torch's epoch e is the rate of optimizer step e + 1; DeepSpeed has stepped its scheduler e times by then,
        # starting from last_batch_iteration -1 (the minimum rate), so its iteration is e - 1
        iteration = self.last_epoch - 1
        if iteration < 0:
            return list(self.min_lrs)
        gamma = self.gamma(iteration)
        return [low + delta * gamma for low, delta in zip(self.min_lrs, self.delta_lrs)]


def _per_group(value, n: int) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * n


def pretrain_optimizer(module: nn.Module, optim: OptimConfig, num_layers: int, total_steps: int,
                       optimizer: Optional[torch.optim.Optimizer] = None):
    """(AdamW, WarmupDecay) as `python -m pretrain` trains with them."""
    optimizer = optimizer if optimizer is not None else adamw(module, optim, num_layers)
    return optimizer, WarmupDecay(optimizer, optim, total_steps)
