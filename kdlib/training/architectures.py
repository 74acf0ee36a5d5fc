"""Where each architecture keeps its attention projections: a small table keyed by transformers' `model_type`.

An entry names the attention block (the last components of its module name, e.g. `attention.self` matches
`encoder.layer.3.attention.self`) and, inside it, either the three query / key / value projections or one
`fused` projection whose output is [Q; K; V] along the last dimension (GPT-2's `c_attn`, split in three equal
parts). `causal` marks decoders (recomputed probabilities also exclude later keys). `rotary` marks architectures
that rotate Q and K after the projection (RoPE): the captured Q/K are pre-rotation, so attention maps
recomputed from them are not the model's and are refused (Q/K/V relations, which never form QK^T across the
two, are fine). Keys and values may be narrower than queries (grouped-query attention: Llama, Qwen2, Mistral):
their width is what the projection gives, and AttentionViews repeats each K/V head over its query heads as the
model does.

Another architecture, in a stage's config (pretrain, finetune, data_pipeline; the rows join the table in every
process before a model runs):

    architectures:
      my_type: {block: attn, query: wq, key: wk, value: wv}   # or {block: attn, fused: wqkv}

or from Python, `register_architecture("my_type", block="attn", query="wq", key="wk", value="wv")`. A model whose
type has no entry still works when it has BERT-style blocks (`...attention.self` with `query`/`key`/`value`), the
rule this table replaced.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from kdlib.schemas import Architecture

_BERT = Architecture("attention.self", "query", "key", "value")
_DECODER = Architecture("self_attn", "q_proj", "k_proj", "v_proj", rotary=True, causal=True)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "mobilebert": _BERT,  # encoder.layer.N.attention.self (its bottleneck.attention is an input projection)
    "distilbert": Architecture("attention", "q_lin", "k_lin", "v_lin"),
    "gpt2": Architecture("attn", fused="c_attn", causal=True),  # Conv1D, [Q; K; V] of the hidden width each
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
}


def register_architecture(model_type: str, *, block: str, query: str = "", key: str = "", value: str = "",
                          fused: str = "", rotary: bool = False, causal: bool = False) -> Architecture:
    """Add (or replace) the entry for `model_type`; returns it."""
    entry = Architecture(block, query, key, value, fused, rotary, causal)
    ARCHITECTURES[model_type] = entry
    return entry


def use_architectures(entries: dict[str, Architecture]) -> None:
    """Add a config's `architectures` rows to the table (replacing a row of the same model_type)."""
    ARCHITECTURES.update(entries)


def _matches(name: str, block: str) -> bool:
    return name == block or name.endswith("." + block)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def find_blocks(model: nn.Module, entry: Architecture) -> list[nn.Module]:
    needed = [entry.fused] if entry.fused else list(entry.parts.values())
    return [m for name, m in model.named_modules() if _matches(name, entry.block) and all(_has(m, p) for p in needed)]


def architecture_of(model: nn.Module) -> tuple[Architecture, list[nn.Module]]:
    """The model's entry (by config.model_type; the BERT rule for a type with no entry) and its attention blocks
    in layer order. Raises a one-line ValueError when neither finds a block."""
    model_type: Optional[str] = getattr(getattr(model, "config", None), "model_type", None)
    entry = ARCHITECTURES.get(model_type) if model_type else None
    blocks = find_blocks(model, entry) if entry else find_blocks(model, _BERT)
    if blocks:
        return (entry or _BERT), blocks
    found = (f"its entry (block={entry.block!r}, " +
             (f"fused={entry.fused!r})" if entry.fused else f"query/key/value={entry.query}/{entry.key}/{entry.value})")
             + " matches no module") if entry else "it has no entry and no BERT-style attention.self.query/key/value"
    raise ValueError(f"{type(model).__name__} (model_type={model_type!r}): no attention blocks found: {found}; add one "
                     f"in the config (architectures: {{{model_type}: {{block: ..., query: ..., key: ..., value: ...}}}}) "
                     f"or with kdlib.training.architectures.register_architecture({model_type!r}, block=..., query=..., "
                     "key=..., value=...) or fused=...")
