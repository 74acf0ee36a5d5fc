"""A student built from the teacher's config: the teacher's config.json with the shape fields replaced
(or, for architecture=bottleneck, a MobileBERT config derived from it; or, with student.config, another
config.json shaped the same way), and teacher weights copied in: DistilBERT's every-other layers, an
explicit list, or (init=svd) those layers compressed into a narrower width (kdlib.students.width).
Decoder families (GPT-2, Llama, Qwen2, Mistral) are handled too: their blocks are `h.<i>` / `layers.<i>`,
and grouped-query heads, head width and per-layer attention types follow the student's shape.

Shared by every stage that builds a student from a teacher: pretrain (masked-LM students) and
finetune (classifier students, BERT-PKD's skip initialisation). Nothing here knows about heads: the
caller builds the model class it needs from `student_config` and calls `copy_teacher_layers`
(pretrain: `init_from_teacher`, which also handles a bottleneck student's embeddings).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from kdlib.errors import ModelLoadError, ReaderError
from kdlib.runtime.jsonl import json_document
from kdlib.runtime.models import load_tokenizer, resolve_model_path
from kdlib.schemas import StudentConfig, init_layer_map
from kdlib.students.bottleneck import bottleneck_config, copy_teacher_embeddings
from kdlib.students.width import compress_teacher

# Decoder families whose students are built and initialised from teacher layers (tested: gpt2, llama)
DECODER_FAMILIES = frozenset({"gpt2", "llama", "qwen2", "mistral"})

# A transformer block's weights: BERT / DistilBERT `...layer.<i>.`, Llama / Qwen / Mistral `model.layers.<i>.`,
# GPT-2 `transformer.h.<i>.`
_LAYER = re.compile(r"^(.*\.(?:layer|layers|h)\.)(\d+)(\..*)$")


def feedforward_width(config) -> int:
    """The feed-forward width of a transformers config (GPT-2 calls it n_inner, None meaning 4 x width)."""
    width = getattr(config, "intermediate_size", None)
    if width is None and getattr(config, "model_type", None) == "gpt2":
        width = config.n_inner or 4 * config.hidden_size
    return width


def _set_feedforward_width(config, width: int) -> None:
    if getattr(config, "model_type", None) == "gpt2":
        config.n_inner = width
    else:
        config.intermediate_size = width


def _reshape_decoder_attention(cfg, teacher_config) -> None:
    """Decoder configs that spell out what the shape implies: grouped-query key/value heads, the head
    width and per-layer attention types follow the student's shape."""
    heads = cfg.num_attention_heads
    kv = getattr(teacher_config, "num_key_value_heads", None)
    if kv is not None:
        # multi-head teachers get multi-head students; a grouped teacher keeps its groups when they divide
        cfg.num_key_value_heads = heads if kv == teacher_config.num_attention_heads or heads % kv else kv
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = cfg.hidden_size // heads
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        cfg.layer_types = [layer_types[min(i, len(layer_types) - 1)] for i in range(cfg.num_hidden_layers)]


def student_config(teacher_config, student: StudentConfig):
    """A copy of the teacher's transformers config with the student's shape (a MobileBertConfig for bottleneck)."""
    if student.architecture == "bottleneck":
        return bottleneck_config(teacher_config, student)
    base = teacher_config if student.config is None else architecture_config(student.config)
    cfg = base.__class__.from_dict(base.to_dict())
    cfg.num_hidden_layers = student.num_layers
    if student.hidden_size is not None:
        cfg.hidden_size = student.hidden_size
    if student.num_attention_heads is not None:
        cfg.num_attention_heads = student.num_attention_heads
    if student.intermediate_size is not None:
        _set_feedforward_width(cfg, student.intermediate_size)
    if cfg.model_type in DECODER_FAMILIES:
        _reshape_decoder_attention(cfg, teacher_config)
    if student.tokenizer is not None:
        _use_tokenizer(cfg, student.tokenizer, keep_vocab=student.config is not None)
    cfg.architectures = None
    return cfg


def _use_tokenizer(cfg, folder: str, keep_vocab: bool) -> None:
    """A student with its own tokenizer: its vocabulary (a student.config may declare a larger, padded one) and
    special-token ids."""
    tokenizer = load_tokenizer(folder, model_config={})
    if not keep_vocab or cfg.vocab_size < len(tokenizer):
        cfg.vocab_size = len(tokenizer)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(cfg, name, getattr(tokenizer, name))


def architecture_config(folder: str):
    """The transformers config in `folder`/config.json (student.config: a student of another family or shape
    than the teacher's), read offline; never runs code shipped with it."""
    from transformers import AutoConfig  # ~1 s to import: only a student.config needs it

    path = resolve_model_path(folder)
    try:
        json_document(path / "config.json", hint="")  # a bad byte or a cut-short file named by line, not by transformers
    except FileNotFoundError:
        pass  # transformers names what is missing
    except ReaderError as err:
        raise ModelLoadError(str(err)) from None
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _same_shape(student: nn.Module, teacher: nn.Module) -> bool:
    a, b = student.config, teacher.config
    return a.hidden_size == b.hidden_size and feedforward_width(a) == feedforward_width(b)


def copy_teacher_layers(student: nn.Module, teacher: nn.Module, teacher_layers: list[int],
                        skip_missing: tuple[str, ...] = ()) -> None:
    """Student layer i <- teacher layer teacher_layers[i] (1-based); every non-layer weight copied as is.
    Weights whose name starts with one of `skip_missing` keep their own values when the teacher lacks
    them (a new task head on a student of a masked-LM teacher). A student narrower than the teacher (or with
    fewer FFN units) gets the weights compressed (init=svd, kdlib.students.width); at the teacher's width and
    feed-forward size that is exactly this copy."""
    if not _same_shape(student, teacher):
        compress_teacher(student, teacher, teacher_layers, skip_missing)
        return
    source = teacher.state_dict()
    target = student.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            match = _LAYER.match(name)
            key = name if match is None else f"{match[1]}{teacher_layers[int(match[2])] - 1}{match[3]}"
            if key not in source and name.startswith(skip_missing):
                continue
            if key not in source or source[key].shape != tensor.shape:
                raise ValueError(f"cannot initialise student weight {name} from teacher weight {key}")
            tensor.copy_(source[key])


def init_from_teacher(student: nn.Module, teacher: nn.Module, shape: StudentConfig,
                      skip_missing: tuple[str, ...] = ()) -> None:
    """Whatever `shape.init` copies from the teacher into a freshly built student (nothing for init=random)."""
    if shape.init == "embeddings":
        copy_teacher_embeddings(student, teacher)
        return
    layers = init_layer_map(shape, teacher.config.num_hidden_layers)
    if layers:
        copy_teacher_layers(student, teacher, layers, skip_missing)


def needs_teacher(shape: StudentConfig) -> bool:
    """Whether building this student reads the teacher's weights."""
    return shape.init != "random"
