"""Config pieces shared by several stages: what to cache from a teacher, the student's shape, and where an
architecture keeps its attention projections.

Some checks need the teacher's config.json (k must not exceed its vocabulary; the student cannot
take more layers than the teacher has). `check_against_teacher` runs them before any work and
reports the field path and the file like any other config error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Optional

from kdlib.errors import fail_field


@dataclass
class TeacherOutputsConfig:
    """Which teacher outputs a transfer set caches."""

    top_k: int = 0  # vocabulary logits kept per position (0: none); with the full log-sum-exp per position
    sampled_tokens: int = 0  # teacher draws per position (T=1, with replacement; 0: none), kept as ids + counts; with top_k: a tail outside it
    dense_logits: bool = False  # all logits of a classifier teacher (task transfer sets)
    hidden_layers: list[int] = field(default_factory=list)  # hidden states to keep (0 = embeddings, L = last layer)
    pooled: Optional[Literal["mean", "cls"]] = None  # a pooled sentence embedding (mean over the mask, or [CLS])
    qkv_layers: list[int] = field(default_factory=list)  # layers (1-based) whose attention query/key/value to keep (MiniLM, TinyBERT attention)
    vector_encoding: Literal["fp16", "int8"] = "fp16"  # how hidden / Q/K/V vectors are stored (kdlib/cache/vectors.py)
    topk_encoding: Literal["fp16", "q8"] = "fp16"  # top-k storage: fp16 logits, or q8 (8-bit levels, delta-coded ids: kdlib/cache/codec.py)
    fidelity_positions: int = 2048  # positions sampled to measure what the top-k and the vector encoding lose

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k: expected 0 (none) or a positive integer, got {self.top_k}")
        if not 0 <= self.sampled_tokens <= 255:  # counts are stored as uint8
            raise ValueError(f"sampled_tokens: expected 0 (none) to 255 draws per position, got {self.sampled_tokens}")
        if any(layer < 0 for layer in self.hidden_layers):
            raise ValueError(f"hidden_layers: expected layer indices >= 0, got {self.hidden_layers}")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            raise ValueError(f"hidden_layers: expected distinct layers, got {self.hidden_layers}")
        if any(layer < 1 for layer in self.qkv_layers):
            raise ValueError(f"qkv_layers: expected transformer layers >= 1 (attention has no layer 0), got {self.qkv_layers}")
        if len(set(self.qkv_layers)) != len(self.qkv_layers):
            raise ValueError(f"qkv_layers: expected distinct layers, got {self.qkv_layers}")
        if self.vector_encoding not in ("fp16", "int8"):
            raise ValueError(f"vector_encoding: expected fp16 or int8, got {self.vector_encoding!r}")
        if self.topk_encoding not in ("fp16", "q8"):
            raise ValueError(f"topk_encoding: expected fp16 or q8, got {self.topk_encoding!r}")
        if self.fidelity_positions < 0:
            raise ValueError(f"fidelity_positions: expected >= 0, got {self.fidelity_positions}")


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its attention projections: a row of kdlib.training.architectures' table, which
    a config extends under `architectures: {<model_type>: {block: ..., query: ..., key: ..., value: ...}}`."""

    block: str  # suffix of the attention block's module name ("attention.self", "self_attn", "attn")
    query: str = ""  # attribute paths of the projections inside the block
    key: str = ""
    value: str = ""
    fused: str = ""  # one projection giving [Q; K; V] on its last dim (equal widths), instead of query/key/value
    rotary: bool = False  # Q/K are rotated after the projection (RoPE): recomputed attention maps are refused
    causal: bool = False  # a decoder: recomputed probabilities also exclude later keys

    def __post_init__(self):
        if not self.block.strip():
            raise ValueError("block: expected the attention block's module name suffix, e.g. attention.self")
        separate = all((self.query, self.key, self.value))
        if self.fused and any((self.query, self.key, self.value)):
            raise ValueError(f"fused: expected either fused or query, key and value, got fused={self.fused!r} and "
                             f"query/key/value={self.query!r}/{self.key!r}/{self.value!r}")
        if not separate and not self.fused:
            missing = [n for n in ("query", "key", "value") if not getattr(self, n)]
            raise ValueError(f"{missing[0]}: expected the projection's attribute path inside the block (or `fused` "
                             f"for one [Q; K; V] projection), got none")

    @property
    def parts(self) -> dict[str, str]:
        return {"query": self.query, "key": self.key, "value": self.value}


@dataclass
class BottleneckConfig:
    """MobileBERT's block shape (Sun et al. 2020), for student.architecture=bottleneck."""

    intra_size: Optional[int] = None  # width inside each block: attention and FFNs (None: a quarter of hidden_size)
    feedforward_networks: int = 4  # stacked FFNs per block (MobileBERT: 4; 1 is a plain block)
    embedding_size: Optional[int] = None  # word-embedding width (None: hidden_size, so the teacher's table fits as is)
    trigram_input: bool = False  # MobileBERT's kernel-3 convolution over the embeddings (for a small embedding_size)
    shared_query_key: bool = True  # query and key read one shared bottleneck (MobileBERT), value the full-width input
    normalization: Literal["layer_norm", "no_norm"] = "layer_norm"  # no_norm: MobileBERT's faster elementwise affine

    def __post_init__(self) -> None:
        for name in ("intra_size", "embedding_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive integer or null, got {value}")
        if self.feedforward_networks < 1:
            raise ValueError(f"feedforward_networks: expected a positive integer, got {self.feedforward_networks}")


@dataclass
class StudentConfig:
    """The student's shape, and how (whether) it is initialised from the teacher.

    init: random; every_other (DistilBERT: teacher layers 2, 4, ...) or explicit (init_layers), copied at the
    teacher's width; svd: those layers compressed into a narrower width, heads and FFN (kdlib.students.width);
    embeddings (bottleneck only): the teacher's embeddings and MLM head, fresh blocks (kdlib.students.bottleneck).
    """

    num_layers: int = 3  # transformer layers
    hidden_size: Optional[int] = None  # width (None: the teacher's); for bottleneck the width between blocks
    num_attention_heads: Optional[int] = None  # heads (None: the teacher's)
    intermediate_size: Optional[int] = None  # feed-forward width (None: the teacher's; bottleneck: 4 x intra_size)
    init: Literal["random", "every_other", "explicit", "svd", "embeddings"] = "random"  # what is copied from the teacher (above)
    init_layers: list[int] = field(default_factory=list)  # teacher layer (1-based) per student layer (explicit, svd)
    architecture: Literal["bert", "bottleneck"] = "bert"  # bert: the teacher's config family; bottleneck: MobileBERT
    bottleneck: Optional[BottleneckConfig] = None  # block shape for architecture=bottleneck (null: the defaults)
    config: Optional[str] = None  # a folder whose config.json is the student's architecture (null: the teacher's), shaped by the fields above
    tokenizer: Optional[str] = None  # the student's own tokenizer folder (null: the teacher's): cross-tokenizer distillation

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"num_layers: expected a positive integer, got {self.num_layers}")
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive integer or null, got {value}")
        if self.architecture == "bottleneck":
            self.bottleneck = self.bottleneck or BottleneckConfig()
            if self.init not in ("random", "embeddings"):
                raise ValueError(f"init: a bottleneck student has no teacher-shaped layers to copy: expected random or "
                                 f"embeddings, got {self.init!r}")
        elif self.bottleneck is not None:
            raise ValueError("bottleneck: only used with architecture=bottleneck")
        elif self.init == "embeddings":
            raise ValueError("init: embeddings is for architecture=bottleneck (a bert student copies whole layers: "
                             "every_other, explicit or svd)")
        attention_width = self.bottleneck.intra_size if self.bottleneck is not None else self.hidden_size
        if attention_width and self.num_attention_heads and attention_width % self.num_attention_heads:
            field_name = "bottleneck.intra_size" if self.bottleneck is not None else "hidden_size"
            raise ValueError(f"num_attention_heads: expected a divisor of {field_name} {attention_width}, "
                             f"got {self.num_attention_heads}")
        if self.init == "explicit" and len(self.init_layers) != self.num_layers:
            raise ValueError(f"init_layers: init=explicit needs one teacher layer per student layer "
                             f"({self.num_layers}), got {len(self.init_layers)}")
        if self.init == "svd" and self.init_layers and len(self.init_layers) != self.num_layers:
            raise ValueError(f"init_layers: init=svd needs one teacher layer per student layer ({self.num_layers}) "
                             f"or none (every other), got {len(self.init_layers)}")
        if self.init not in ("explicit", "svd") and self.init_layers:
            raise ValueError(f"init_layers: only used with init=explicit or svd, got init={self.init!r}")
        for name in ("config", "tokenizer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a folder or null, got {value!r}")
            if value is not None and self.init != "random":
                raise ValueError(f"init: a student with its own {name} cannot copy teacher weights (they are shaped "
                                 f"for another {'architecture' if name == 'config' else 'vocabulary'}): expected "
                                 f"random, got {self.init!r}")
        if (self.config or self.tokenizer) and self.architecture != "bert":
            raise ValueError("architecture: a bottleneck student is derived from the teacher's config; it takes no "
                             "config or tokenizer of its own")
        # Whether a width fits init from teacher layers needs the teacher: see check_against_teacher.


def init_layer_map(student: StudentConfig, teacher_layers: int) -> list[int]:
    """Teacher layers (1-based) that initialise student layers 1..N, per the init rule."""
    if student.init == "every_other" or (student.init == "svd" and not student.init_layers):
        return [2 * (i + 1) for i in range(student.num_layers)]  # DistilBERT: 2, 4, 6, ...
    if student.init in ("explicit", "svd"):
        return list(student.init_layers)
    return []


# GPT-2's config.json names its shape differently (transformers maps the names on the config object)
_GPT2_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
               "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


def shape_fields(config: dict) -> dict:
    """config.json with the shape under BERT's names (num_hidden_layers, hidden_size, ...) whatever the family."""
    out = dict(config)
    for name, standard in _GPT2_NAMES.items():
        if out.get(standard) is None and name in out:
            out[standard] = out[name]
    if out.get("model_type") == "gpt2" and out.get("intermediate_size") is None and out.get("hidden_size"):
        out["intermediate_size"] = 4 * out["hidden_size"]
    return out


def check_against_teacher(source: str, teacher_config: dict, *, outputs: TeacherOutputsConfig | None = None,
                          student: StudentConfig | None = None, outputs_path: str = "teacher_outputs",
                          student_path: str = "student", max_length: int | None = None,
                          max_length_path: str = "max_length") -> None:
    """Checks that need the teacher's config.json; errors name the config file and the field."""
    teacher_config = shape_fields(teacher_config)
    vocab = teacher_config.get("vocab_size")
    positions = teacher_config.get("max_position_embeddings")
    layers = teacher_config.get("num_hidden_layers")
    fail = partial(fail_field, source)

    if max_length is not None and positions is not None and max_length > positions:
        fail(max_length_path, f"expected at most the teacher's {positions} position embeddings, got {max_length}")
    if outputs is not None:
        if vocab is not None and outputs.top_k > vocab:
            fail(f"{outputs_path}.top_k", f"expected at most the teacher's vocabulary size {vocab}, got {outputs.top_k}")
        if vocab is not None and outputs.sampled_tokens and outputs.top_k >= vocab:
            fail(f"{outputs_path}.sampled_tokens", f"a sampled tail needs ids outside the top-k, but top_k "
                 f"{outputs.top_k} covers the teacher's whole vocabulary of {vocab}")
        if layers is not None:
            bad = [h for h in outputs.hidden_layers if h > layers]
            if bad:
                fail(f"{outputs_path}.hidden_layers", f"the teacher has layers 0..{layers}, got {bad}")
            bad = [h for h in outputs.qkv_layers if h > layers]
            if bad:
                fail(f"{outputs_path}.qkv_layers", f"the teacher has attention layers 1..{layers}, got {bad}")
    if student is not None and layers is not None:
        _check_student(fail, student, student_path, teacher_config)


def _check_student(fail, student: StudentConfig, path: str, teacher: dict) -> None:
    """The student's shape against the teacher's config.json: which teacher layers and widths init can use."""
    layers, width = teacher.get("num_hidden_layers"), teacher.get("hidden_size")
    heads, ffn = teacher.get("num_attention_heads"), teacher.get("intermediate_size")
    family = teacher.get("model_type")
    if family in ("gpt2", "llama", "qwen2", "mistral"):
        if student.init == "svd":
            fail(f"{path}.init", f"init=svd compresses BERT-family layers; for a {family} teacher copy layers at the "
                 "teacher's width (every_other, explicit) or start from random")
        if student.architecture == "bottleneck":
            fail(f"{path}.architecture", f"the bottleneck student is MobileBERT, derived from a BERT-family teacher, "
                 f"got a {family} teacher")
    wanted = init_layer_map(student, layers)
    if wanted and max(wanted) > layers:
        fail(f"{path}.init_layers" if student.init_layers else f"{path}.num_layers",
             f"init={student.init} needs teacher layers {wanted} but the teacher has {layers} "
             f"(every_other allows at most {layers // 2} student layers)")
    if wanted and min(wanted) < 1:
        fail(f"{path}.init_layers", f"teacher layers are numbered 1..{layers}, got {wanted}")
    if student.init in ("every_other", "explicit"):
        if student.hidden_size not in (None, width):
            fail(f"{path}.hidden_size", f"copying teacher layers needs the teacher's width {width}, "
                 f"got {student.hidden_size} (use init=svd, or init=random, for a narrower student)")
        if ffn is not None and student.intermediate_size not in (None, ffn):
            fail(f"{path}.intermediate_size", f"copying teacher layers needs the teacher's feed-forward width {ffn}, "
                 f"got {student.intermediate_size} (init=svd keeps the teacher's largest units)")
    if student.init == "svd":
        mine = student.hidden_size or width
        if width is not None and mine > width:
            fail(f"{path}.hidden_size", f"init=svd compresses the teacher's width {width}: expected at most {width}, "
                 f"got {mine}")
        if ffn is not None and (student.intermediate_size or ffn) > ffn:
            fail(f"{path}.intermediate_size", f"init=svd keeps teacher feed-forward units: expected at most {ffn}, "
                 f"got {student.intermediate_size}")
        my_heads = student.num_attention_heads or heads
        if heads and width and my_heads and (my_heads > heads or mine // my_heads > width // heads):
            fail(f"{path}.num_attention_heads", f"init=svd keeps teacher heads: expected at most the teacher's {heads} "
                 f"heads of at most {width // heads} dimensions, got {my_heads} heads of {mine // my_heads}")
    if student.architecture == "bottleneck":
        block = student.bottleneck
        outer = student.hidden_size or width
        intra = block.intra_size or (outer // 4 if outer else None)
        my_heads = student.num_attention_heads or heads
        if intra and my_heads and intra % my_heads:
            fail(f"{path}.bottleneck.intra_size", f"expected a multiple of the {my_heads} attention heads "
                 f"(attention runs inside the bottleneck), got {intra}")
        if student.init == "embeddings" and student.hidden_size not in (None, width):
            fail(f"{path}.hidden_size", f"init=embeddings copies the teacher's embeddings and MLM head, so the width "
                 f"between blocks must be the teacher's {width}, got {student.hidden_size}")
        if block.embedding_size is not None and outer and block.embedding_size > outer:
            fail(f"{path}.bottleneck.embedding_size", f"expected at most the width {outer}, got {block.embedding_size}")
