"""BERT-EMD layer loss: the transport-plan-weighted sum of per-layer-pair distances.

The plan comes from ``kdlib.students.layer_maps.EmdLayerWeights.plan`` (exact EMD via POT); it is a constant here,
so gradients flow only through the differentiable cost matrix.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdlib.losses.registry import register_loss


@register_loss("bert_emd", kind="intermediate",
               paper="Li et al. 2020, BERT-EMD: Many-to-Many Layer Mapping for BERT Compression with Earth Mover's Distance")
def bert_emd(layer_cost: Tensor, transport_plan) -> Tensor:
    """sum_{j,i} F_ji * D_ji, F = EMD plan between teacher and student layer weights, D = per-pair distance -- Li et al. 2020 (BERT-EMD).

    layer_cost: (M teacher layers, N student layers) tensor, e.g. from layer_maps.pairwise_layer_cost.
    transport_plan: (M, N) array or tensor (treated as a constant).
    """
    plan = torch.as_tensor(np.asarray(transport_plan) if not isinstance(transport_plan, Tensor) else transport_plan)
    plan = plan.detach().to(device=layer_cost.device, dtype=layer_cost.dtype)
    if plan.shape != layer_cost.shape:
        raise ValueError(f"transport_plan: expected shape {tuple(layer_cost.shape)}, got {tuple(plan.shape)}")
    return (plan * layer_cost).sum()
