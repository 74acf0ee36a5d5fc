"""The optimisation loop both teacher preparations share (the masked-LM head, the decoder from scratch): AdamW with
linear warm-up into cosine decay, a progress bar showing the recent loss. Kept apart from kdlib/training (the
DeepSpeed core for students): a teacher here is one small model on one process, trained once."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from tqdm import tqdm


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, steps: int):
    """lr x min(1, (s + 1) / warmup) x (1 + cos(pi s / steps)) / 2 at step s."""
    warmup = max(warmup_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                             * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def optimise(loss_at: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer, schedule, steps: int, *,
             desc: str, clip: Optional[Iterable[torch.nn.Parameter]] = None) -> list[float]:
    """`steps` optimizer steps on loss_at(step) (gradients clipped to norm 1 over `clip` when given); the losses."""
    clipped = list(clip) if clip is not None else None
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=None)
    for step in bar:
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clipped is not None:
            torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses
