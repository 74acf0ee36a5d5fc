"""The report config: where each stage's config is (the report finds every output through them) and the targets."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdlib.config import Prose
from report.numbers import numbers_in


@dataclass
class StageConfigs:
    """The config file of each stage the demo ran; each one's output_dir is where the report reads."""

    teacher: str  # python -m teacher
    pipeline: str  # python -m data_pipeline
    pretrain: str  # python -m launch local / python -m pretrain
    evaluate: str  # python -m evaluate
    finetune: str  # python -m finetune (the int8 arm comes from its deploy step)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a config file path, got {value!r}")


@dataclass
class Targets:
    """What the demo aims for; measured and reported, never asserted."""

    word_similarity_percent: float = 97.0  # SimLex-999 and WordSim-353 rho, % of the teacher's
    pooled_cosine: float = 0.95  # mean cosine of the general student's pooled embedding to the teacher's
    speedup: float = 1.9  # general student sequences/s over the teacher's, same CPU, side by side
    task_percent: float = 97.0  # KD student accuracy, % of the teacher's
    int8_max_loss_points: float = 1.0  # accuracy points the int8 artefact may lose against the fp32 KD student

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # nan too
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


@dataclass
class ReportConfig:
    """One report folder (report.md, numbers.json, PNGs) from the outputs of a finished demo."""

    output_dir: str
    steps: str  # the steps file scripts/demo.sh writes (python -m report.steps)
    configs: StageConfigs
    teacher_model: str = "teacher"  # names in the evaluate config's models
    student_model: str = "student"
    untrained_model: str = "untrained"
    task_metric: str = "accuracy"  # the finetune metric the task targets use
    targets: Targets = field(default_factory=Targets)
    notes: dict[str, Prose] = field(default_factory=dict)  # target name -> why it is missed (shown only when missed)

    def __post_init__(self) -> None:
        for name in ("output_dir", "steps"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a path, got {value!r}")
        known = set(vars(Targets()))
        for key, text in self.notes.items():
            if key not in known:
                raise ValueError(f"notes.{key}: not a target (targets: {', '.join(sorted(known))})")
            if numbers_in(text):
                raise ValueError(f"notes.{key}: a note may not carry digits: every number in the report must come "
                                 "from a metrics file (write it out, or put a path in backticks)")
