"""AdaShare's policy regularisers (Sun et al. 2020): functions of the (task, layer) execute probabilities of a
multi-task student (kdlib.students.adashare), not of any model output. Only policies that are learning now count
(`policy_mask`: the curriculum's top layers after the warm-up); both are 0 when none is."""

from __future__ import annotations

import torch
from torch import Tensor

from kdlib.losses.registry import register_loss

_PAPER = "Sun et al. 2020, AdaShare: Learning What To Share For Efficient Deep Multi-Task Learning (NeurIPS)"


def _check(select_probs: Tensor, policy_mask: Tensor) -> None:
    if select_probs.dim() != 2 or policy_mask.shape != select_probs.shape:
        raise ValueError(f"select_probs: expected (tasks, layers) with a policy_mask of the same shape, got "
                         f"{tuple(select_probs.shape)} and {tuple(policy_mask.shape)}")


@register_loss("adashare_sparsity", kind="regularizer", paper=_PAPER)
def adashare_sparsity(select_probs: Tensor, policy_mask: Tensor) -> Tensor:
    """mean over learned (task, layer) of -log(1 - p_execute) -- Sun et al. 2020 (AdaShare sparsity, as in its code)

    The released AdaShare code takes the cross-entropy of each policy towards "skip"; the paper writes
    sum log p_execute. Both push every learned policy towards skipping; this one is >= 0 and its mean does
    not grow with the number of tasks and layers. 1 - p is clamped at 1e-6.
    """
    _check(select_probs, policy_mask)
    mask = policy_mask.to(select_probs.dtype)
    terms = -torch.log((1.0 - select_probs).clamp(min=1e-6))
    return (terms * mask).sum() / mask.sum().clamp(min=1.0)


@register_loss("adashare_sharing", kind="regularizer", paper=_PAPER)
def adashare_sharing(select_probs: Tensor, policy_mask: Tensor) -> Tensor:
    """mean over task pairs of sum_l (L - l) / L |p_k1,l - p_k2,l|, l = 0 the bottom layer -- Sun et al. 2020 (AdaShare sharing)

    Lower layers weigh more, so tasks share low-level layers and differ, if at all, near the top. A layer
    counts once both tasks' policies at it are learning (policy_mask); 0 with fewer than two tasks.
    """
    _check(select_probs, policy_mask)
    tasks, layers = select_probs.shape
    if tasks < 2:
        return select_probs.sum() * 0.0
    weights = (layers - torch.arange(layers, dtype=select_probs.dtype, device=select_probs.device)) / layers
    mask = policy_mask.to(select_probs.dtype)
    first, second = torch.triu_indices(tasks, tasks, offset=1, device=select_probs.device)
    gaps = (select_probs[first] - select_probs[second]).abs() * mask[first] * mask[second]
    return (gaps * weights).sum() / first.numel()
