"""Run a frozen teacher on a batch and turn its outputs into cache rows (numpy, per row).

Used by the pipeline's teacher DoFn and by anything else that needs the exact values the cache
would hold. Vocabulary outputs are the top-k ids and logits plus the full log-sum-exp per position,
so the kept probability mass is exact and the rest can be treated explicitly by the loss.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kdlib.cache.codec import encode_sorted_ids, encode_topk, stored_topk_logits
from kdlib.cache.sampling import sample_columns
from kdlib.cache.schema import id_dtype
from kdlib.cache.vectors import SCALE_SUFFIX, encode, vector_column, vector_names
from kdlib.schemas import TeacherOutputsConfig
from kdlib.training.internals import capture_qkv


def teacher_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, outputs: TeacherOutputsConfig):
    """One forward pass under inference_mode; returns the raw tensors the config asks for (Q/K/V of the
    `qkv_layers` captured from the attention blocks' projections, as the online teacher's are)."""
    want_hidden = bool(outputs.hidden_layers) or outputs.pooled is not None
    with torch.inference_mode(), capture_qkv(model, enabled=bool(outputs.qkv_layers)) as qkv:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=want_hidden)
    result = {}
    logits = getattr(out, "logits", None)
    if logits is not None:
        result["logits"] = logits.float()
    if want_hidden:
        hidden = out.hidden_states if getattr(out, "hidden_states", None) is not None else (out.last_hidden_state,)
        result["hidden_states"] = hidden
    if outputs.qkv_layers:
        result["qkv"] = {layer: qkv[layer] for layer in outputs.qkv_layers}
    return result


def teacher_vectors(raw: dict, name: str) -> torch.Tensor:
    """(B, T, H) float32 values of a cached vector column (hidden_<l>, query_<l>, key_<l>, value_<l>)."""
    kind, layer = vector_column(name)
    if kind == "hidden":
        return raw["hidden_states"][layer].float()
    return raw["qkv"][layer][kind].float()


def topk_with_lse(logits_btv: torch.Tensor, k: int):
    """(B,T,V) logits -> top-k ids (B,T,k), top-k logits (B,T,k), full log-sum-exp (B,T)."""
    top = torch.topk(logits_btv, k, dim=-1, sorted=True)
    return top.indices, top.values, torch.logsumexp(logits_btv, dim=-1)


def topk_fidelity(logits_nv: torch.Tensor, k: int, encoding: str = "fp16") -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: kept mass sum_topk p, and KL(p || p_hat) where p_hat keeps the top-k exactly and
    spreads the remaining mass evenly over the other V-k ids (the reconstruction the cache allows,
    from the logits as stored with `encoding`: fp16, or q8's decoded levels)."""
    kept, kl, _ = topk_reconstruction(logits_nv, k, encoding)
    return kept, kl


def topk_reconstruction(logits_nv: torch.Tensor, k: int, encoding: str = "fp16"):
    """topk_fidelity's kept mass and KL per position, and the largest |stored - teacher logit| of each
    position's k entries (what the encoding itself loses)."""
    logits_nv = logits_nv.double()
    V = logits_nv.shape[-1]
    log_p = torch.log_softmax(logits_nv, dim=-1)
    top_ids, top_logits, lse = topk_with_lse(logits_nv, k)
    # what the cache holds (the teacher's float32 logits, as stored and decoded)
    stored = torch.from_numpy(stored_topk_logits(top_logits.float().numpy(), encoding)).double()
    error = (stored - top_logits).abs().amax(-1)
    log_p_top = stored - lse.unsqueeze(-1)
    kept = log_p_top.exp().sum(-1).clamp(max=1.0)
    if k < V:
        fill = torch.log((1 - kept).clamp(min=1e-12) / (V - k)).unsqueeze(-1).expand_as(log_p)
    else:
        fill = torch.full_like(log_p, -torch.inf)  # every id is overwritten below
    log_hat = fill.scatter(-1, top_ids, log_p_top)
    kl = (log_p.exp() * (log_p - log_hat)).sum(-1)
    return kept.float(), kl.float(), error.float()


def rows_from_outputs(raw: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor, outputs: TeacherOutputsConfig,
                      vocab_size: int, seeds: Optional[list[int]] = None) -> list[dict]:
    """Cut a batch's raw teacher tensors into per-row numpy values, dropping padding positions. `seeds`: one
    per row, seeding that row's teacher draws (needed with outputs.sampled_tokens; see kdlib/cache/sampling.py)."""
    lengths = attention_mask.sum(-1).tolist()
    rows = [dict() for _ in lengths]
    ids, vals, lse = topk_with_lse(raw["logits"], outputs.top_k) if outputs.top_k else (None, None, None)
    if outputs.sampled_tokens:
        if seeds is None or len(seeds) != len(lengths):
            raise ValueError(f"seeds: sampled_tokens needs one seed per row ({len(lengths)}), got {seeds!r}")
        for i, n in enumerate(lengths):  # the tail excludes exactly the cached top-k ids, ties included
            rows[i].update(sample_columns(raw["logits"][i, :n], outputs.sampled_tokens, seeds[i],
                                          None if ids is None else ids[i, :n], id_dtype(vocab_size)))
    if outputs.sampled_tokens and outputs.topk_encoding == "q8":  # the shard keeps differences (codec.py)
        for row in rows:  # (sample_ids stays in the row: the pipeline's fidelity reads it; the schema drops it)
            row["sample_id_deltas"] = encode_sorted_ids(row["sample_ids"], row["sample_sizes"], id_dtype(vocab_size))
    if outputs.top_k:
        ids_np = ids.numpy().astype(id_dtype(vocab_size))
        vals_np, lse_np = vals.numpy().astype(np.float16), lse.numpy().astype(np.float32)
        if outputs.topk_encoding == "q8":  # kdlib/cache/codec.py: 8-bit levels, entries by id, ids delta-coded
            B, T, k = ids.shape
            coded = encode_topk(ids.reshape(-1, k).numpy(), vals.reshape(-1, k).numpy(), id_dtype(vocab_size))
            coded = {name: v.reshape(B, T, -1) for name, v in coded.items()}
            for i, n in enumerate(lengths):
                rows[i].update({name: v[i, :n].reshape(-1) for name, v in coded.items()}, lse=lse_np[i, :n])
        else:
            for i, n in enumerate(lengths):
                rows[i].update(topk_ids=ids_np[i, :n].reshape(-1), topk_logits=vals_np[i, :n].reshape(-1),
                               lse=lse_np[i, :n])
    if outputs.dense_logits:
        dense = raw["logits"].numpy().astype(np.float32)
        for i in range(len(lengths)):
            rows[i]["logits"] = dense[i]
    for name in vector_names(outputs.hidden_layers, outputs.qkv_layers):
        h = teacher_vectors(raw, name).numpy()
        for i, n in enumerate(lengths):
            stored = encode(h[i, :n], outputs.vector_encoding)
            rows[i][name] = stored["values"]
            if "scale" in stored:
                rows[i][name + SCALE_SUFFIX] = stored["scale"]
    if outputs.pooled is not None:
        last = raw["hidden_states"][-1].float()
        if outputs.pooled == "cls":
            pooled = last[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).float()
            pooled = (last * m).sum(1) / m.sum(1).clamp(min=1)
        for i, row in enumerate(rows):
            row["pooled"] = pooled[i].numpy().astype(np.float32)
    return rows
