"""TinyBERT-style candidates: the teacher's masked-LM head proposes whole-word replacements.

`make_mlm_candidates_fn` wraps an already-loaded AutoModelForMaskedLM and its fast tokenizer
(loading is the caller's job: no hub access here). Only single-wordpiece predictions count:
special tokens, "[unused..]"-style tokens, "##" continuation pieces and punctuation-only pieces
are never proposed, so every candidate replaces one whole word.
"""
from __future__ import annotations

from typing import Any

from .core import MlmCandidatesFn


def make_mlm_candidates_fn(
    model: Any,
    tokenizer: Any,
    top_k: int = 15,
    *,
    batch_size: int = 32,
    max_length: int = 512,
    text_mask_token: str = "[MASK]",
) -> MlmCandidatesFn:
    """masked texts -> per text, per occurrence of `text_mask_token`, the top_k whole-word predictions.

    A mask cut off by truncation gets an empty list (the augmenter then keeps that word).
    """
    import torch  # ~1.2 s to import: data_pipeline's --help imports kdlib.text.augment without it

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
    if tokenizer.mask_token is None:
        raise ValueError("tokenizer: expected a tokenizer with a mask token, got mask_token=None")
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    words: dict[int, str] = {}
    for i, piece in enumerate(pieces):
        if piece is None or i in special or piece.startswith("##"):
            continue
        if piece.startswith("[") and piece.endswith("]"):
            continue
        word = tokenizer.convert_tokens_to_string([piece]).strip()
        if word and not any(ch.isspace() for ch in word) and any(ch.isalnum() for ch in word):
            words[i] = word
    if not words:
        raise ValueError("tokenizer: expected some whole-word pieces in the vocabulary, found none")
    device = next(model.parameters()).device
    blocked = torch.ones(vocab_size, dtype=torch.bool, device=device)
    blocked[torch.tensor(sorted(words), device=device)] = False
    k = min(top_k, len(words))
    mask_id = tokenizer.mask_token_id
    model.eval()

    def candidates(masked_texts: list[str]) -> list[list[list[str]]]:
        out: list[list[list[str]]] = []
        for at in range(0, len(masked_texts), batch_size):
            chunk = list(masked_texts[at : at + batch_size])
            n_masks = [t.count(text_mask_token) for t in chunk]
            if text_mask_token != tokenizer.mask_token:
                chunk = [t.replace(text_mask_token, tokenizer.mask_token) for t in chunk]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            enc = {name: tensor.to(device) for name, tensor in enc.items()}
            with torch.inference_mode():
                logits = model(**enc).logits
            is_mask = enc["input_ids"] == mask_id
            scores = logits[is_mask].float().masked_fill(blocked, float("-inf"))
            top = scores.topk(k, dim=-1).indices.tolist() if scores.shape[0] else []
            row = 0
            for n_text, n_seen in zip(n_masks, is_mask.sum(dim=1).tolist()):
                per_mask = [[words[i] for i in top[row + m]] for m in range(n_seen)]
                row += n_seen
                out.append((per_mask + [[] for _ in range(n_text - n_seen)])[:n_text])
        return out

    return candidates
