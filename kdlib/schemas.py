"""Config pieces shared by several stages: what to cache from a teacher, and the student's shape.

Some checks need the teacher's config.json (k must not exceed its vocabulary; the student cannot
take more layers than the teacher has). `check_against_teacher` runs them before any work and
reports the field path and the file like any other config error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdlib.errors import ConfigError


@dataclass
class TeacherOutputsConfig:
    """Which teacher outputs a transfer set caches."""

    top_k: int = 0  # vocabulary logits kept per position (0: none); with the full log-sum-exp per position
    dense_logits: bool = False  # all logits of a classifier teacher (task transfer sets)
    hidden_layers: list[int] = field(default_factory=list)  # hidden states to keep (0 = embeddings, L = last layer)
    pooled: Optional[Literal["mean", "cls"]] = None  # a pooled sentence embedding (mean over the mask, or [CLS])
    fidelity_positions: int = 2048  # positions sampled to measure the kept mass and KL of the top-k

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k: expected 0 (none) or a positive integer, got {self.top_k}")
        if any(layer < 0 for layer in self.hidden_layers):
            raise ValueError(f"hidden_layers: expected layer indices >= 0, got {self.hidden_layers}")
        if len(set(self.hidden_layers)) != len(self.hidden_layers):
            raise ValueError(f"hidden_layers: expected distinct layers, got {self.hidden_layers}")
        if self.fidelity_positions < 0:
            raise ValueError(f"fidelity_positions: expected >= 0, got {self.fidelity_positions}")


@dataclass
class StudentConfig:
    """The student's shape, and how (whether) it is initialised from teacher layers."""

    num_layers: int = 3  # transformer layers
    hidden_size: Optional[int] = None  # width (None: the teacher's width)
    num_attention_heads: Optional[int] = None  # heads (None: the teacher's)
    intermediate_size: Optional[int] = None  # feed-forward width (None: the teacher's)
    init: Literal["random", "every_other", "explicit"] = "random"  # every_other: DistilBERT; explicit: init_layers
    init_layers: list[int] = field(default_factory=list)  # teacher layers (1-based) copied into student layers, for init=explicit

    def __post_init__(self) -> None:
        if self.num_layers <= 0:
            raise ValueError(f"num_layers: expected a positive integer, got {self.num_layers}")
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: expected a positive integer or null, got {value}")
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads: expected a divisor of hidden_size {self.hidden_size}, "
                             f"got {self.num_attention_heads}")
        if self.init == "explicit" and len(self.init_layers) != self.num_layers:
            raise ValueError(f"init_layers: init=explicit needs one teacher layer per student layer "
                             f"({self.num_layers}), got {len(self.init_layers)}")
        if self.init != "explicit" and self.init_layers:
            raise ValueError(f"init_layers: only used with init=explicit, got init={self.init!r}")
        # Whether a width fits init from teacher layers needs the teacher: see check_against_teacher.


def init_layer_map(student: StudentConfig, teacher_layers: int) -> list[int]:
    """Teacher layers (1-based) that initialise student layers 1..N, per the init rule."""
    if student.init == "every_other":
        return [2 * (i + 1) for i in range(student.num_layers)]  # DistilBERT: 2, 4, 6, ...
    if student.init == "explicit":
        return list(student.init_layers)
    return []


def check_against_teacher(source: str, teacher_config: dict, *, outputs: TeacherOutputsConfig | None = None,
                          student: StudentConfig | None = None, outputs_path: str = "teacher_outputs",
                          student_path: str = "student", max_length: int | None = None,
                          max_length_path: str = "max_length") -> None:
    """Checks that need the teacher's config.json; errors name the config file and the field."""
    vocab = teacher_config.get("vocab_size")
    positions = teacher_config.get("max_position_embeddings")
    layers = teacher_config.get("num_hidden_layers")
    width = teacher_config.get("hidden_size")

    def fail(path: str, message: str) -> None:
        raise ConfigError(f"{source}: field '{path}': {message}")

    if max_length is not None and positions is not None and max_length > positions:
        fail(max_length_path, f"expected at most the teacher's {positions} position embeddings, got {max_length}")
    if outputs is not None:
        if vocab is not None and outputs.top_k > vocab:
            fail(f"{outputs_path}.top_k", f"expected at most the teacher's vocabulary size {vocab}, got {outputs.top_k}")
        if layers is not None:
            bad = [h for h in outputs.hidden_layers if h > layers]
            if bad:
                fail(f"{outputs_path}.hidden_layers", f"the teacher has layers 0..{layers}, got {bad}")
    if student is not None and layers is not None:
        wanted = init_layer_map(student, layers)
        if wanted and max(wanted) > layers:
            fail(f"{student_path}.num_layers" if student.init == "every_other" else f"{student_path}.init_layers",
                 f"init={student.init} needs teacher layers {wanted} but the teacher has {layers} "
                 f"(every_other allows at most {layers // 2} student layers)")
        if wanted and min(wanted) < 1:
            fail(f"{student_path}.init_layers", f"teacher layers are numbered 1..{layers}, got {wanted}")
        if wanted and student.hidden_size not in (None, width):
            fail(f"{student_path}.hidden_size", f"copying teacher layers needs the teacher's width {width}, "
                 f"got {student.hidden_size} (use init=random for a narrower student)")
