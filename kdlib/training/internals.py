"""What losses read from a model: logits, hidden states, pooled embeddings, per-layer query/key/value.

Q/K/V are captured by forward hooks on each attention block's query/key/value projections (or its fused
QKV projection, split in three), found through the per-architecture table in kdlib.training.architectures,
so the attention implementation (eager or sdpa) does not matter and no attention map is materialised unless
a loss asks for one. Attention scores and probabilities are recomputed from Q and K exactly as BERT does:
QK^T / sqrt(d_head) (+ key mask before the softmax); with grouped-query attention each K/V head serves
heads / kv_heads query heads, as in the model. Rotary (RoPE) architectures refuse recomputed attention maps.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from kdlib.losses.chunked import FactoredLogits, at_least_fp32
from kdlib.training.architectures import Architecture, architecture_of


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The attention blocks (per kdlib.training.architectures), in layer order."""
    return architecture_of(model)[1]


class QKVStore(dict):
    """`store[layer]` (1-based) -> {"query","key","value"} (B, T, D); K/V are narrower under grouped-query
    attention. `architecture` is the table entry the blocks were found with (None when nothing was captured)."""

    architecture: Optional[Architecture] = None


@contextmanager
def capture_qkv(model: nn.Module, enabled: bool = True):
    """Inside the block, `store[layer]` (1-based) holds {"query","key","value"} outputs (B, T, D) of the last forward."""
    store = QKVStore()
    handles = []
    if enabled:
        entry, blocks = architecture_of(model)
        store.architecture = entry
        for layer, block in enumerate(blocks, start=1):
            if entry.fused:
                def fused_hook(_module, _inputs, output, layer=layer):
                    if output.shape[-1] % 3:
                        raise ValueError(f"fused projection {entry.fused!r}: width {output.shape[-1]} is not 3 equal "
                                         "query/key/value parts")
                    q, k, v = output.split(output.shape[-1] // 3, dim=-1)
                    store[layer] = {"query": q, "key": k, "value": v}
                handles.append(block.get_submodule(entry.fused).register_forward_hook(fused_hook))
                continue
            for part, path in entry.parts.items():
                def hook(_module, _inputs, output, layer=layer, part=part):
                    store.setdefault(layer, {})[part] = output
                handles.append(block.get_submodule(path).register_forward_hook(hook))
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
        self.architecture: Optional[Architecture] = getattr(qkv, "architecture", None)

    def kv_heads(self, layer: int) -> int:
        """K/V heads of `layer`: `heads` unless grouped-query attention narrowed K/V (width / d_head)."""
        d_head = self.query(layer).shape[-1] // self.heads
        width = self.key(layer).shape[-1]
        kv = width // d_head if d_head else 0
        if not kv or kv * d_head != width or self.heads % kv:
            raise ValueError(f"layer {layer}: key/value width {width} is not a whole number of {d_head}-wide heads "
                             f"dividing the {self.heads} query heads")
        return kv

    def _per_head(self, x: Tensor, layer: int) -> Tensor:
        """(B, T, D_kv) -> (B, H, T, d): K/V heads, each repeated over its group of query heads (GQA)."""
        kv = self.kv_heads(layer)
        heads = split_heads(x, kv)
        return heads if kv == self.heads else heads.repeat_interleave(self.heads // kv, dim=1)

    def query(self, layer: int) -> Tensor:
        return self.qkv[layer]["query"]

    def key(self, layer: int) -> Tensor:
        return self.qkv[layer]["key"]

    def value(self, layer: int) -> Tensor:
        return self.qkv[layer]["value"]

    def values(self, layer: int) -> Tensor:
        """(B, H, T, d) per-head values."""
        return self._per_head(self.value(layer), layer)

    def scores(self, layer: int) -> Tensor:
        """(B, H, T, T) pre-softmax scores QK^T / sqrt(d), without the additive mask (the losses mask)."""
        if self.architecture is not None and self.architecture.rotary:
            raise ValueError("attention scores/probabilities: this architecture rotates Q and K after the captured "
                             "projections (RoPE), so maps recomputed from them are not the model's; use Q/K/V "
                             "relations (minilmv2_relations) or hidden-state losses")
        if layer not in self._scores:
            q, k = split_heads(self.query(layer), self.heads), self._per_head(self.key(layer), layer)
            self._scores[layer] = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return self._scores[layer]

    def probs(self, layer: int) -> Tensor:
        """(B, H, T, T) attention probabilities, padded keys excluded as in the model."""
        keys = self.mask[:, None, None, :].bool()
        scores = self.scores(layer)
        if self.architecture is not None and self.architecture.causal:
            t = scores.shape[-1]
            keys = keys & torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
        return torch.softmax(scores.masked_fill(~keys, torch.finfo(scores.dtype).min), dim=-1)


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(B, T, D) -> (B, D): the mean over real tokens, or the first ([CLS]) token; as the cache pools."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


# Model types whose logits are exactly get_output_embeddings()(head input): nothing after the projection
# (no soft-capping, scaling or bias added outside it), so the projection can be left to the losses.
FACTORABLE_HEADS = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "gpt2", "llama", "qwen2",
                              "mistral"})


def factorable_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's output projection when its logits can be left factored (FACTORABLE_HEADS), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FACTORABLE_HEADS or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, nn.Linear) else None


@contextmanager
def factor_output_head(model: nn.Module, enabled: bool):
    """Inside the block, the output projection sees zero positions, so the model returns (B, 0, V) logits,
    and `store["hidden"]` holds what the projection would have read (B, T, H). Nothing is captured when
    the projection is not called (e.g. MobileBERT multiplies by its weight directly): logits stay dense."""
    store: dict[str, Tensor] = {}
    head = factorable_head(model) if enabled else None
    if head is None:
        yield store, None
        return

    def hook(_module, args):
        (x,) = args
        store["hidden"] = x
        return (x[..., :0, :],)

    handle = head.register_forward_pre_hook(hook)
    try:
        yield store, head
    finally:
        handle.remove()


class ModelView:
    """One model's outputs for one batch, for the input providers: computed on demand, kept for the batch."""

    def __init__(self, output, qkv: Optional[dict], heads: int, mask: Tensor, factored: Optional[FactoredLogits] = None):
        self.output, self.mask = output, mask
        self.views = AttentionViews(qkv, heads, mask) if qkv is not None else None
        self.factored = factored
        self.without_logits = False  # run_model(logits=False) skipped the output projection
        self._logits: Optional[Tensor] = None

    @property
    def logits(self) -> Tensor:
        """At least fp32 logits whatever the engine's precision (losses are computed in fp32 or wider)."""
        if self.factored is not None:
            return self.factored.dense()
        if self.without_logits:
            raise RuntimeError("this model ran without its output projection (run_model(logits=False)): "
                               "no objective was planned to read its logits")
        if self._logits is None:
            self._logits = at_least_fp32(self.output.logits)
        return self._logits

    @property
    def loss_logits(self):
        """What the losses get: the factored logits when the head was left to them, else `logits`."""
        return self.factored if self.factored is not None else self.logits

    def hidden(self, layer: int) -> Tensor:
        """(B, T, D) output of layer `layer` (0 = embeddings), as Hugging Face's hidden_states."""
        return self.output.hidden_states[layer]

    def pooled(self, mode: str) -> Tensor:
        return pool(self.output.hidden_states[-1], self.mask, mode)


def run_model(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, hidden: bool, qkv: bool,
              heads: int, chunk_size: int = 0, logits: bool = True) -> ModelView:
    """Forward pass with what the objectives need captured; used for student, peer and online teacher alike.

    chunk_size > 0 leaves a factorable output head's projection to the losses (kdlib.losses.chunked),
    chunk_size positions at a time. logits=False skips that projection altogether (an online teacher
    whose logits no objective reads: at a 30k vocabulary it is a third of a small teacher's forward)."""
    skip_head = chunk_size > 0 or not logits
    with capture_qkv(model, enabled=qkv) as store, factor_output_head(model, skip_head) as (head_in, head):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
    factored = None
    if "hidden" in head_in:
        if out.logits.shape[-2] != 0:
            raise RuntimeError(f"{type(model).__name__}: the output projection's input was replaced, yet the "
                               f"logits have {out.logits.shape[-2]} positions; remove its model type from "
                               "FACTORABLE_HEADS")
        if logits:
            factored = FactoredLogits(head_in["hidden"], head.weight, head.bias, chunk_size)
    view = ModelView(out, store if qkv else None, heads, attention_mask, factored)
    view.without_logits = "hidden" in head_in and not logits
    return view
