"""MobileBERT-style bottleneck students (Sun et al. 2020), built with transformers' own MobileBertForMaskedLM,
so an export loads with plain `AutoModelForMaskedLM.from_pretrained` and no project code.

The config is derived from the teacher's: the same vocabulary, positions, token types, activation,
dropout and padding id (so the teacher's tokenizer and transfer set fit), the teacher's width between
blocks (MobileBERT's `hidden_size`: feature-map transfer, hidden_mse on block outputs, needs no
projection) and the teacher's heads (attention transfer per head). Inside each block the stream is
squeezed to `intra_size` (attention and `feedforward_networks` stacked FFNs run there) and expanded
back; its transformer layers are freshly initialised, as in MobileBERT.

init=embeddings copies what the shapes allow: the word table (as is when embedding_size is the
teacher's width; otherwise its `embedding_size` largest-norm columns, with `embedding_transformation`
the least-squares map back to the full width), position and token-type tables, the embedding
LayerNorm (layer_norm only: no_norm does not normalise) and the whole MLM head: the transform, the
output bias, and the head's extra `dense` rows, which hold the word-table columns the narrower
embedding lacks, with the transform's outputs permuted to match, so the head computes exactly the
teacher's logits from a teacher-like last hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.schemas import StudentConfig


def bottleneck_sizes(width: int, student: StudentConfig) -> dict:
    """hidden (between blocks), intra (inside), intermediate (each FFN) and embedding widths."""
    block = student.bottleneck
    hidden = student.hidden_size or width
    intra = block.intra_size or hidden // 4
    return {"hidden": hidden, "intra": intra, "intermediate": student.intermediate_size or 4 * intra,
            "embedding": block.embedding_size or hidden}


def bottleneck_config(teacher_config, student: StudentConfig):
    """A MobileBertConfig of the student's shape, sharing the teacher's vocabulary, positions and activation."""
    from transformers import MobileBertConfig  # ~1 s to import: only a bottleneck student needs it

    t = teacher_config
    block = student.bottleneck
    sizes = bottleneck_sizes(t.hidden_size, student)
    return MobileBertConfig(
        vocab_size=t.vocab_size, embedding_size=sizes["embedding"], hidden_size=sizes["hidden"],
        num_hidden_layers=student.num_layers, num_attention_heads=student.num_attention_heads or t.num_attention_heads,
        intermediate_size=sizes["intermediate"], hidden_act=t.hidden_act, hidden_dropout_prob=t.hidden_dropout_prob,
        attention_probs_dropout_prob=t.attention_probs_dropout_prob, max_position_embeddings=t.max_position_embeddings,
        type_vocab_size=t.type_vocab_size, initializer_range=t.initializer_range, layer_norm_eps=t.layer_norm_eps,
        pad_token_id=t.pad_token_id, use_bottleneck=True, intra_bottleneck_size=sizes["intra"],
        use_bottleneck_attention=False, key_query_shared_bottleneck=block.shared_query_key,
        num_feedforward_networks=block.feedforward_networks, normalization_type=block.normalization,
        trigram_input=block.trigram_input, classifier_activation=False, tie_word_embeddings=True)


def _find(state: dict, suffix: str) -> torch.Tensor:
    hits = [k for k in state if k.endswith(suffix)]
    if len(hits) != 1:
        raise ValueError(f"init=embeddings: expected one BERT-style teacher weight *{suffix}, found {hits}")
    return state[hits[0]]


def embedding_columns(words: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the `size` word-table columns of largest norm, in increasing order (all when size = width)."""
    order = torch.argsort(-words.double().norm(dim=0), stable=True)[:size]
    return torch.sort(order).values


def copy_teacher_embeddings(student: nn.Module, teacher: nn.Module) -> None:
    """init=embeddings (module docstring): the teacher's embeddings and MLM head into a MobileBertForMaskedLM
    (a MobileBERT classifier, which has no MLM head, gets the embeddings)."""
    source = teacher.state_dict()
    cfg = student.config
    words = _find(source, "embeddings.word_embeddings.weight").double()  # (V, D)
    width = words.shape[1]
    if cfg.hidden_size != width:
        raise ValueError(f"init=embeddings: the student's width between blocks {cfg.hidden_size} must be the "
                         f"teacher's {width}")
    keep = embedding_columns(words, cfg.embedding_size)
    rest = torch.tensor(sorted(set(range(width)) - set(keep.tolist())), dtype=torch.long)
    order = torch.cat([keep, rest])  # the transform's outputs: kept columns first, as the head reads them
    emb = student.mobilebert.embeddings
    head = getattr(getattr(student, "cls", None), "predictions", None)  # None: a classifier (finetune) has no MLM head
    with torch.no_grad():
        emb.word_embeddings.weight.copy_(words[:, keep])
        emb.position_embeddings.weight.copy_(_find(source, "embeddings.position_embeddings.weight"))
        emb.token_type_embeddings.weight.copy_(_find(source, "embeddings.token_type_embeddings.weight"))
        if cfg.trigram_input or cfg.embedding_size != width:
            lift = torch.linalg.lstsq(words[:, keep], words).solution  # (E, D): words[:, keep] @ lift ~ words
            weight = torch.zeros_like(emb.embedding_transformation.weight, dtype=torch.float64)
            start = cfg.embedding_size if cfg.trigram_input else 0  # trigram input: [next, this, previous]
            weight[:, start:start + cfg.embedding_size] = lift.T
            emb.embedding_transformation.weight.copy_(weight)
            emb.embedding_transformation.bias.zero_()
        if cfg.normalization_type == "layer_norm":
            emb.LayerNorm.weight.copy_(_find(source, "embeddings.LayerNorm.weight"))
            emb.LayerNorm.bias.copy_(_find(source, "embeddings.LayerNorm.bias"))
        if head is not None:
            for name, target in head.transform.named_parameters():  # dense.weight/bias, LayerNorm.weight/bias
                target.copy_(_find(source, f"predictions.transform.{name}")[order])
            head.dense.weight.copy_(words[:, rest].T)
            head.bias.copy_(_find(source, "cls.predictions.bias"))
    student.tie_weights()


def register_head_parameters(model: nn.Module) -> None:
    """MobileBERT's MLM head multiplies by its `decoder` and `dense` weights inside its own forward, never calling
    those submodules; ZeRO-3 gathers a module's parameters only when the module itself runs, so it must be told
    to gather them for the head (a no-op bookkeeping attribute under ZeRO 0-2 and outside DeepSpeed)."""
    head = getattr(getattr(model, "cls", None), "predictions", None)
    if head is None or not hasattr(head, "decoder"):
        return
    from deepspeed.runtime.zero import register_external_parameter  # deepspeed: seconds to import; ZeRO-3 only

    for parameter in (head.decoder.weight, head.decoder.bias, head.dense.weight):
        register_external_parameter(head, parameter)
