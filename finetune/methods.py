"""The task stage's distillation methods, one table looked up by `distill.method`: what each method trains, where
its no-KD baseline arm starts, and what it checks. Code that differs by method reads the method's entry here
instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from kdlib.schemas import StudentConfig
from kdlib.students.theseus import TheseusModel
from kdlib.errors import fail_field

Start = tuple[Optional[StudentConfig], Optional[str]]  # (shape built from the teacher, or None), (folder, or None)


def configured_student(cfg) -> Start:
    """The student the config names: its folder (student.path), else its shape built from the teacher."""
    if cfg.student.path is not None:
        return None, cfg.student.path
    return cfg.student.shape, None


def _no_start(cfg) -> Start:
    return None, None  # the method builds its model over the fine-tuned teacher


def _successor_start(cfg) -> Start:
    """Theseus' baseline: the successor's initial weights (teacher layers 1..n) alone, trained on the labels."""
    n = cfg.distill.theseus.successor_layers
    return StudentConfig(num_layers=n, init="explicit", init_layers=list(range(1, n + 1))), None


def _successor(run, teacher_model):
    return TheseusModel(teacher_model, run.theseus, seed=run.seed)


def _successor_config(cfg) -> None:
    if cfg.student.path is not None:
        raise ValueError("student.path: method theseus builds its successor from the fine-tuned teacher's layers; "
                         "leave student.path null")


def _successor_shape(cfg, source: str, teacher_dict: dict) -> tuple[int, int, int]:
    n, total = cfg.distill.theseus.successor_layers, teacher_dict["num_hidden_layers"]
    if total % n:
        fail_field(source, "distill.theseus.successor_layers", f"expected a divisor of the teacher's {total} layers "
                        f"(each successor layer replaces the same number of teacher layers), got {n}")
    return n, teacher_dict["hidden_size"], teacher_dict["num_attention_heads"]


def _nothing(*args) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One distillation method of the task stage."""

    name: str  # distill.method
    student_start: Callable[[Any], Start]  # where the KD arm's student starts
    baseline_start: Callable[[Any], Start]  # where the baseline arm starts (hard labels only, same steps)
    build_over_teacher: Optional[Callable] = None  # (run, loaded teacher) -> the trained model; None: the student
    run_fields: Callable[[Any], dict] = lambda distill: {}  # method settings the KD run carries (RunConfig fields)
    check_config: Callable[[Any], None] = _nothing  # ValueError("<field>: ...") for fields the method cannot use
    student_shape: Optional[Callable] = None  # (cfg, source, teacher dict) -> checked (layers, width, heads) of the
    #                                           model it builds; None: the configured student is checked
    peer: bool = True  # a second student can train beside it (deep mutual learning, loss dml)
    multitask: bool = True  # multi-task runs may use it

    def needs_teacher_model(self) -> bool:
        return self.build_over_teacher is not None


METHODS = {m.name: m for m in (
    Method("kd", student_start=configured_student, baseline_start=configured_student),
    Method("theseus", student_start=_no_start, baseline_start=_successor_start, build_over_teacher=_successor,
           run_fields=lambda distill: {"theseus": distill.theseus}, check_config=_successor_config,
           student_shape=_successor_shape, peer=False, multitask=False),
)}


def method_named(name: str) -> Method:
    """The table's entry for `name`; ValueError naming the known methods."""
    if name not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {name!r}")
    return METHODS[name]
