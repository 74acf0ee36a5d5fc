"""Masking helpers shared by the token-level losses: padding must never reach a loss value or gradient.

Inputs at padded positions are *replaced* (not multiplied) before any arithmetic, so garbage there --
huge values, inf or NaN -- cannot leak through 0 * inf or through the backward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def valid_mask(mask: Optional[Tensor], prefix: torch.Size, device: torch.device) -> Tensor:
    """Boolean validity of shape ``prefix`` (1/True = real token); None means every position is real."""
    if mask is None:
        return torch.ones(prefix, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(prefix):
        raise ValueError(f"mask: expected shape {tuple(prefix)}, got {tuple(mask.shape)}")
    return mask.to(device=device).bool()


def fill_invalid(x: Tensor, valid: Tensor, value: float = 0.0) -> Tensor:
    """``x`` with every padded position (leading dims matching ``valid``) set to ``value``."""
    v = valid.reshape(valid.shape + (1,) * (x.dim() - valid.dim()))
    return x.masked_fill(~v, value)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``valid``; 0 when nothing is valid."""
    v = valid.reshape(valid.shape + (1,) * (values.dim() - valid.dim())).expand_as(values)
    total = torch.where(v, values, torch.zeros_like(values)).sum()
    return total / v.sum().clamp(min=1).to(values.dtype)


def check_temperature(temperature) -> None:
    """Raise ValueError unless every temperature is > 0 (a float or a tensor of per-position values)."""
    if isinstance(temperature, Tensor):
        if not bool((temperature > 0).all()):
            raise ValueError("temperature: expected > 0 everywhere")
    elif not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
