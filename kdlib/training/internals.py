"""What losses read from a model: logits, hidden states, pooled embeddings, per-layer query/key/value.

Q/K/V are captured by forward hooks on each self-attention block's `query`/`key`/`value` linear
layers (BERT-family naming), so the attention implementation (eager or sdpa) does not matter and no
attention map is materialised unless a loss asks for one. Attention scores and probabilities are
recomputed from Q and K exactly as BERT does: QK^T / sqrt(d_head) (+ key mask before the softmax).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules (with query/key/value linears), in layer order."""
    blocks = [m for name, m in model.named_modules()
              if name.endswith("attention.self") and all(hasattr(m, a) for a in ("query", "key", "value"))]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no BERT-style self-attention blocks (attention.self.query/key/value); "
                         "attention and relation losses support the BERT family")
    return blocks


@contextmanager
def capture_qkv(model: nn.Module, enabled: bool = True):
    """Inside the block, `store[layer]` (1-based) holds {"query","key","value"} outputs (B, T, D) of the last forward."""
    store: dict[int, dict[str, Tensor]] = {}
    handles = []
    if enabled:
        for layer, block in enumerate(attention_blocks(model), start=1):
            for part in ("query", "key", "value"):
                def hook(_module, _inputs, output, layer=layer, part=part):
                    store.setdefault(layer, {})[part] = output
                handles.append(getattr(block, part).register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, D) -> (B, H, T, D/H)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


class AttentionViews:
    """Per-layer attention tensors computed on demand from captured Q/K/V and cached for one batch."""

    def __init__(self, qkv: dict[int, dict[str, Tensor]], heads: int, mask: Tensor):
        self.qkv, self.heads, self.mask = qkv, heads, mask
        self._scores: dict[int, Tensor] = {}

    def query(self, layer: int) -> Tensor:
        return self.qkv[layer]["query"]

    def key(self, layer: int) -> Tensor:
        return self.qkv[layer]["key"]

    def value(self, layer: int) -> Tensor:
        return self.qkv[layer]["value"]

    def values(self, layer: int) -> Tensor:
        """(B, H, T, d) per-head values."""
        return split_heads(self.value(layer), self.heads)

    def scores(self, layer: int) -> Tensor:
        """(B, H, T, T) pre-softmax scores QK^T / sqrt(d), without the additive mask (the losses mask)."""
        if layer not in self._scores:
            q, k = split_heads(self.query(layer), self.heads), split_heads(self.key(layer), self.heads)
            self._scores[layer] = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return self._scores[layer]

    def probs(self, layer: int) -> Tensor:
        """(B, H, T, T) attention probabilities, padded keys excluded as in the model."""
        keys = self.mask[:, None, None, :].bool()
        scores = self.scores(layer)
        return torch.softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, T, D) -> (B, D): the mean over real tokens, or the first ([CLS]) token; as the cache pools."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class ModelView:
    """One model's outputs for one batch, for the input providers: computed on demand, kept for the batch."""

    def __init__(self, output, qkv: Optional[dict], heads: int, mask: Tensor):
        self.output, self.mask = output, mask
        self.views = AttentionViews(qkv, heads, mask) if qkv is not None else None
        self._logits: Optional[Tensor] = None

    @property
    def logits(self) -> Tensor:
        """fp32 logits whatever the engine's precision (losses are computed in fp32)."""
        if self._logits is None:
            self._logits = self.output.logits.float()
        return self._logits

    def hidden(self, layer: int) -> Tensor:
        """(B, T, D) output of layer `layer` (0 = embeddings), as Hugging Face's hidden_states."""
        return self.output.hidden_states[layer]

    def pooled(self, mode: str) -> Tensor:
        return pool(self.output.hidden_states[-1], self.mask, mode)


def run_model(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, hidden: bool, qkv: bool,
              heads: int) -> ModelView:
    """Forward pass with what the objectives need captured; used for student, peer and online teacher alike."""
    with capture_qkv(model, enabled=qkv) as store:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
    return ModelView(out, store if qkv else None, heads, attention_mask)
