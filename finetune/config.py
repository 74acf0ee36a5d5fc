"""The task-distillation config: the labelled task, the teacher's fine-tuning, the task transfer set,
the student, the distillation method, the no-KD baseline and the evaluation protocol.

Everything here is checked when the file is loaded; checks that need model folders or the data
(labels, class counts, tokenizers, layer counts) run in `finetune.validate` before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from kdlib.students.adashare import AdaShareConfig
from kdlib.text.augment import AugmentConfig
from kdlib.config import check_positive_ints
from kdlib.training.deepspeed_engine import EngineConfig, OptimConfig
from kdlib.students.layer_maps import LayerMapConfig
from kdlib.teachers.multi_teacher import MultiTeacherConfig
from kdlib.losses.objectives import ObjectiveConfig, validate_objectives
from kdlib.tasks.readers import TaskConfig
from kdlib.losses.schedules import ScheduleConfig
from kdlib.schemas import Architecture, StudentConfig
from kdlib.tasks.sampling import TaskSamplingConfig
from kdlib.students.theseus import TheseusConfig
from finetune.methods import method_named


def _engine(learning_rate: float, micro_batch: int, warmup: int) -> EngineConfig:
    return EngineConfig(zero_stage=0, micro_batch=micro_batch,
                        optim=OptimConfig(learning_rate=learning_rate, warmup_steps=warmup))


def _small_engine(engine: EngineConfig) -> None:
    if engine.zero_stage == 3:
        raise ValueError("engine.zero_stage: expected 0-2 (task runs keep the best and final weights from each rank's "
                         "full copy), got 3")


@dataclass
class TeacherConfig:
    """Step 1: fine-tune the teacher on each fold's training examples (or take an already fine-tuned one)."""

    init: Optional[str] = None  # the encoder to fine-tune (folder or package:<module>); a classifier head is added
    finetuned: Optional[str] = None  # an already fine-tuned classifier folder instead (it must not have seen the test data)
    seeds: list[int] = field(default_factory=list)  # several teachers per fold, one per seed (multi-teacher KD); empty: one
    steps: int = 200  # optimizer steps at most (early stopping usually ends sooner)
    eval_every: int = 20  # steps between validation evaluations (early stopping reads them)
    patience: int = 3  # evaluations without a better validation accuracy before stopping
    engine: EngineConfig = field(default_factory=lambda: _engine(5e-5, 16, 10))  # batch and optimizer of fine-tuning
    trust_remote_code: bool = False  # run Python code shipped with the model folder (off: never by default)

    def __post_init__(self) -> None:
        if (self.init is None) == (self.finetuned is None):
            raise ValueError("init: expected exactly one of 'init' (an encoder to fine-tune) or 'finetuned' "
                             "(a fine-tuned classifier folder)")
        check_positive_ints(self, "steps", "eval_every", "patience")
        _small_engine(self.engine)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        if len(self.seeds) > 1 and self.finetuned is not None:
            raise ValueError("seeds: several teachers are fine-tuned here, one per seed; with 'finetuned' there is one")


@dataclass
class TransferConfig:
    """Step 2: the task transfer set per fold: augmented training examples with the teacher's outputs."""

    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(copies=20))  # Tang et al. / TinyBERT
    augment_model: Optional[str] = None  # masked-LM folder proposing TinyBERT swaps (needed when mlm_replace_prob > 0)
    hidden_layers: list[int] = field(default_factory=list)  # teacher hidden states to cache beyond those objectives need
    num_shards: int = 4  # Parquet shards per transfer set
    batch_size: int = 32  # sequences per teacher forward
    torch_threads: int = 1  # torch threads per pipeline worker
    tokenize_per_model: bool = False  # keep each row's text so a student with another tokenizer encodes it itself
    unlabeled: int = 0  # evaluation.mode split: this many further train-split texts outside the labelled budget,
    #                     in the transfer set without labels (the teacher's outputs only; the baseline never sees them)

    def __post_init__(self) -> None:
        check_positive_ints(self, "num_shards", "batch_size")
        if isinstance(self.unlabeled, bool) or not isinstance(self.unlabeled, int) or self.unlabeled < 0:
            raise ValueError(f"unlabeled: expected an integer >= 0, got {self.unlabeled!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads: expected >= 0, got {self.torch_threads}")
        if self.augment.mlm_replace_prob > 0 and self.augment_model is None:
            raise ValueError("augment_model: augment.mlm_replace_prob > 0 needs a masked-LM folder to propose swaps "
                             "(the fine-tuned teacher is a classifier)")


@dataclass
class StudentSpec:
    """Where the student starts: a student folder (a general student from pretrain, any BERT-family folder), or a
    shape built from the fine-tuned teacher with teacher layers copied in (DistilBERT / BERT-PKD init)."""

    path: Optional[str] = None  # a model folder; its encoder is kept, a new classifier head is added (seeded)
    shape: StudentConfig = field(default_factory=lambda: StudentConfig(num_layers=3, init="every_other"))  # when path is null
    trust_remote_code: bool = False  # run Python code shipped with the model folder


@dataclass
class PhaseConfig:
    """One phase of a multi-phase run (TinyBERT: intermediate layers first, then the prediction layer)."""

    name: str  # shown in logs and the report
    steps: int  # optimizer steps of this phase
    objectives: list[ObjectiveConfig]  # the losses active during this phase only

    def __post_init__(self) -> None:
        check_positive_ints(self, "steps")
        self.objectives = validate_objectives(self.objectives)
        for i, obj in enumerate(self.objectives):
            if obj.weight_schedule is not None:
                raise ValueError(f"objectives[{i}].weight_schedule: inside a phase the weight is the phase's window; "
                                 "use a separate phase instead")


def default_objectives() -> list[ObjectiveConfig]:
    """Hinton et al.: soft targets at T = 2 with weight 1 - alpha, hard labels with weight alpha = 0.5."""
    return [ObjectiveConfig(name="kd_kl", weight=0.5, params={"temperature": 2.0}),
            ObjectiveConfig(name="hard_ce", weight=0.5)]


@dataclass
class DistillConfig:
    """Step 3: how the student learns from the teacher."""

    method: Literal["kd", "theseus"] = "kd"  # kd: a student trained on the objectives; theseus: module replacement
    objectives: list[ObjectiveConfig] = field(default_factory=default_objectives)  # weighted losses (ignored with phases)
    phases: list[PhaseConfig] = field(default_factory=list)  # instead of objectives: phases run one after another
    steps: int = 300  # optimizer steps (with phases: their sum, filled in)
    layer_map: Optional[LayerMapConfig] = None  # teacher layer -> student layer for intermediate losses (skip, last, ...)
    online_teacher: bool = False  # run the teacher on every batch (attention losses; uncached hidden states)
    hard_labels: Literal["original", "all"] = "original"  # rows whose label the hard loss reads: augmented copies
    #                                                     keep the teacher's soft targets only unless "all"
    theseus: TheseusConfig = field(default_factory=TheseusConfig)  # method: theseus
    multi_teacher: MultiTeacherConfig = field(default_factory=MultiTeacherConfig)  # with teacher.seeds: how targets combine
    engine: EngineConfig = field(default_factory=lambda: _engine(1e-4, 32, 10))  # batch and optimizer of the student
    eval_every: int = 50  # steps between validation evaluations (logged; held-out test data is never read here)

    def __post_init__(self) -> None:
        check_positive_ints(self, "steps", "eval_every")
        _small_engine(self.engine)
        if self.phases:
            names = [p.name for p in self.phases]
            if len(set(names)) != len(names):
                raise ValueError(f"phases: expected distinct names, got {names}")
            self.steps = sum(p.steps for p in self.phases)
            self.objectives = phase_objectives(self.phases)
        self.objectives = validate_objectives(self.objectives)


def phase_objectives(phases: list[PhaseConfig]) -> list[ObjectiveConfig]:
    """Phases as one objective list: each objective weighted by a window schedule that is 1 during its phase and 0
    outside (boundaries in fractions of the run, so the switch happens at exactly the configured step)."""
    total = sum(p.steps for p in phases)
    out, start = [], 0
    for phase in phases:
        window = ScheduleConfig(name="window", start=1.0, end=0.0, milestones=[start / total, (start + phase.steps) / total])
        for obj in phase.objectives:
            out.append(ObjectiveConfig(name=obj.name, weight=obj.weight, params=dict(obj.params),
                                       weight_schedule=window, temperature_schedule=obj.temperature_schedule))
        start += phase.steps
    return out


def regression_objectives() -> list[ObjectiveConfig]:
    """Tang et al.'s logit regression on the teacher's output, plus the targets themselves (alpha = 0.5)."""
    return [ObjectiveConfig(name="logit_mse", weight=0.5), ObjectiveConfig(name="hard_mse", weight=0.5)]


@dataclass
class BaselineConfig:
    """The no-KD baseline: the same student initialisation, hard labels only, the same steps, no augmentation."""

    enabled: bool = True  # train it (the report compares against it)


@dataclass
class EvaluationConfig:
    """k-fold cross-validation (mode folds), or one fold from the task's hashed train/dev/test split (mode split):
    every arm is scored on the same held-out examples, over several student seeds."""

    mode: Literal["folds", "split"] = "folds"  # split: one fold (0): test = the task's test split, valid = its dev
    #                                            split, train = a labelled budget of its train split
    folds: int = 5  # stratified folds; each is held out once (mode split: one; 5, the default, is read as 1)
    seeds: list[int] = field(default_factory=lambda: [0])  # student seeds per fold (teacher: the first seed)
    split_seed: int = 0  # seed of the fold assignment
    validation_fraction: float = 0.1  # of each fold's training examples: the teacher's early-stopping set
    speed_batch: int = 32  # sequences per batch when timing teacher and students side by side
    speed_threads: int = 1  # torch threads when timing
    speed_repeats: int = 3  # timed passes (best taken)
    labelled: Optional[int] = None  # mode split: a stratified, seeded sample of this many train-split examples is
    #                                 the labelled part (teacher, baseline, hard labels); null: the whole train split
    max_valid: Optional[int] = None  # mode split: a stratified, seeded sample of at most this many dev-split
    #                                  examples is the validation set (null: the whole dev split)

    def __post_init__(self) -> None:
        if self.mode not in ("folds", "split"):
            raise ValueError(f"mode: expected 'folds' or 'split', got {self.mode!r}")
        for name in ("labelled", "max_valid"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected null or an integer >= 1, got {value!r}")
            if value is not None and self.mode != "split":
                raise ValueError(f"{name}: applies to mode split (the task's train/dev/test split), got mode "
                                 f"{self.mode!r}")
        if self.mode == "split":
            if self.folds not in (1, 5):
                raise ValueError(f"folds: mode split makes one fold from the task's split; expected 1 (or unset), "
                                 f"got {self.folds!r}")
            self.folds = 1
        elif isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise ValueError(f"folds: expected an integer >= 2, got {self.folds!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected a non-empty list of distinct seeds, got {self.seeds}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise ValueError(f"validation_fraction: expected a fraction in (0, 0.5), got {self.validation_fraction}")
        check_positive_ints(self, "speed_batch", "speed_threads", "speed_repeats")


@dataclass
class DeployStepConfig:
    """The deploy step: each KD student exported to ONNX and int8 (kdlib.deploy), scored on its held-out fold as
    the arm kd-int8, with a size / speed / quality table in the report."""

    enabled: bool = False  # export and score the int8 artefact of every KD student
    threads: int = 1  # CPU threads of every timed candidate (torch and onnxruntime alike)
    speed_length: int = 128  # tokens per timed sequence
    speed_batches: list[int] = field(default_factory=lambda: [1, 32])  # latency at the smallest, throughput at the largest
    repeats: int = 3  # timed passes per candidate (best taken)

    def __post_init__(self) -> None:
        check_positive_ints(self, "threads", "speed_length", "repeats")
        if not self.speed_batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                         for b in self.speed_batches):
            raise ValueError(f"speed_batches: expected positive batch sizes, got {self.speed_batches!r}")


@dataclass
class NamedTask:
    """One task of a multi-task run."""

    name: str  # a short name: the task's folder under output_dir and its name in logs and reports
    task: TaskConfig  # the labelled set
    labels: list[str] = field(default_factory=list)  # label names in index order (empty: the sorted labels found)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"name: expected letters, digits, '-' or '_', got {self.name!r}")


@dataclass
class MultiTaskConfig:
    """One student for several tasks: a head per task, tasks sampled per step so that no large task dominates."""

    sampling: TaskSamplingConfig = field(default_factory=TaskSamplingConfig)  # task i drawn with p ~ n_i ** alpha
    single_task: bool = True  # also distil one student per task (the report then compares multi- with single-task)
    adashare: AdaShareConfig = field(default_factory=AdaShareConfig)  # per-task layer skipping (kdlib.students.adashare)


@dataclass
class FinetuneConfig:
    """Task-specific distillation with k-fold evaluation against the teacher and a no-KD baseline."""

    output_dir: str  # folds/, per-run folders, report/
    teacher: TeacherConfig  # step 1 (with several tasks: the settings of each task's teachers)
    task: Optional[TaskConfig] = None  # the labelled set (kdlib.text.readers: csv, tsv, jsonl, fastText)
    tasks: list[NamedTask] = field(default_factory=list)  # or several: multi-task distillation (each in output_dir/<name>)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)  # with tasks
    labels: list[str] = field(default_factory=list)  # label names in index order (empty: the sorted labels found)
    task_type: Literal["classification", "regression"] = "classification"  # regression: numeric labels, one output
    max_length: int = 128  # tokens per example, special tokens included (longer ones are truncated)
    transfer: TransferConfig = field(default_factory=TransferConfig)  # step 2
    student: StudentSpec = field(default_factory=StudentSpec)  # where the student starts
    distill: DistillConfig = field(default_factory=DistillConfig)  # step 3
    baseline: BaselineConfig = field(default_factory=BaselineConfig)  # the no-KD comparison
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # step 4
    deploy: DeployStepConfig = field(default_factory=DeployStepConfig)  # int8 artefacts of the KD students
    threads: int = 0  # torch CPU threads (0: torch's default)
    progress_bar: bool = True  # tqdm bars (quiet when stderr is not a terminal)
    architectures: dict[str, Architecture] = field(default_factory=dict)  # more rows of the Q/K/V table by model_type (kdlib.training.architectures)

    def __post_init__(self) -> None:
        if (self.task is None) == (not self.tasks):
            raise ValueError("task: expected exactly one of 'task' (one labelled set) or 'tasks' (multi-task)")
        if self.tasks:
            names = [t.name for t in self.tasks]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ValueError(f"tasks: expected at least two tasks with distinct names, got {names}")
            if self.labels:
                raise ValueError("labels: with tasks, each task lists its own labels")
            if not method_named(self.distill.method).multitask or len(self.teacher.seeds) > 1:
                raise ValueError("tasks: multi-task runs distil with method kd from one teacher per task and fold")
            if self.multitask.adashare.enabled and (self.distill.layer_map is not None or self.distill.online_teacher):
                raise ValueError("multitask.adashare.enabled: a student that skips layers per task takes output "
                                 "losses only; remove distill.layer_map and distill.online_teacher")
        elif self.multitask.adashare.enabled:
            raise ValueError("multitask.adashare.enabled: AdaShare learns which layers each task executes; it needs "
                             "'tasks' (two or more)")
        if self.max_length < 8:
            raise ValueError(f"max_length: expected at least 8, got {self.max_length}")
        if self.task_type == "regression":
            if self.labels:
                raise ValueError("labels: a regression task has numeric targets, not label names")
            if self.distill.objectives == default_objectives():  # the classification default: use the regression one
                self.distill.objectives = regression_objectives()
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: expected distinct names, got {self.labels}")
        if self.threads < 0:
            raise ValueError(f"threads: expected >= 0, got {self.threads}")
        self._check_split_mode()
        method_named(self.distill.method).check_config(self)

    def _check_split_mode(self) -> None:
        """mode split reads the task's own train/dev/test split: one task read whole with all three parts."""
        if self.evaluation.mode != "split":
            if self.transfer.unlabeled:
                raise ValueError(f"transfer.unlabeled: unlabeled texts come from the task's train split outside the "
                                 f"labelled budget; expected 0 unless evaluation.mode is 'split', got "
                                 f"{self.transfer.unlabeled}")
            return
        if self.tasks:
            raise ValueError("evaluation.mode: mode split reads one task's hashed split; multi-task runs use mode folds")
        task = self.task
        if not task.whole_table:
            raise ValueError("evaluation.mode: mode split needs a task read whole with its hashed train/dev/test split "
                             "(a csv task with normalise or dedupe, and split: null, so that every example carries its "
                             "part), got a task with none of normalise, dedupe, confidence_column, min_confidence")
        if task.split is not None:
            raise ValueError(f"task.split: mode split needs all three parts of the task (split: null), got "
                             f"{task.split!r}")
        empty = [name for name in ("train", "dev", "test") if task.split_fractions[name] <= 0]
        if empty:
            raise ValueError(f"task.split_fractions: mode split needs a share above 0 for train, dev and test, got "
                             f"{task.split_fractions!r}")
