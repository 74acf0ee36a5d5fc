"""Everything the task stage can check before it trains anything, each failure one ConfigError naming the
config file and the field: labels the teacher's head lacks, a student tokenizer that is not the teacher's,
more folds than the smallest class allows, Theseus layer counts, layer maps, and whether every objective
can get its inputs (kdlib.training.providers). It also works out what the transfer sets must cache: the
teacher hidden states and pooled embeddings the objectives read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdlib.losses import get_spec
from kdlib.runtime.fingerprints import tokenizer_fingerprint
from kdlib.runtime.models import check_model_folder, resolve_model_path
from kdlib.tasks.readers import label_number
from kdlib.schemas import check_against_teacher, shape_fields
from kdlib.errors import ConfigError, ModelLoadError, ReaderError, fail_field, field_named
from kdlib.training.objective_plan import fail_objective, layer_offer
from kdlib.training.providers import PROVIDERS, Offer
from kdlib.training.module import plan_objectives
from finetune.config import FinetuneConfig
from finetune.folds import class_counts, parts_of, read_examples
from finetune.methods import method_named


@dataclass
class Setup:
    """What validation found out: the label list in index order, and what the transfer sets must cache."""

    labels: list[str]
    needs: dict = field(default_factory=dict)  # hidden_layers: [...], pooled: "mean" | None
    examples: int = 0


def check_labels(cfg: FinetuneConfig, source: str, found: list[str], teacher_dict: dict, prefix: str = "") -> list[str]:
    labels = list(cfg.labels) or found
    unknown = sorted(set(found) - set(labels))
    if unknown:
        fail_field(source, f"{prefix}labels", f"the task has labels {unknown} that are not listed in {labels}")
    if len(found) < 2:
        fail_field(source, f"{prefix}task", f"a classification task needs examples of at least two labels, found only "
                   f"{found} (a max_examples cut of a file sorted by label does this)")
    if cfg.teacher.finetuned is not None:
        head = [str(v) for _, v in sorted((int(k), v) for k, v in (teacher_dict.get("id2label") or {}).items())]
        lacking = [name for name in labels if name not in head]
        if lacking or len(head) != len(labels):
            fail_field(source, "teacher.finetuned", f"the teacher's head has labels {head}, the task's labels are {labels} "
                       f"({'missing ' + str(lacking) if lacking else 'the counts differ'}); fine-tune a teacher for these "
                       "labels (teacher.init) or list the labels in the head's order")
        labels = head  # predictions are indices of the teacher's head
    return labels


def check_regression(cfg: FinetuneConfig, source: str, examples, teacher_dict: dict, prefix: str = "") -> list[str]:
    """Numeric targets, enough examples for the folds, objectives that fit one output; the label list is one name."""
    bad = next((ex for ex in examples if label_number(ex.label) is None), None)
    if bad is not None:
        fail_field(source, f"{prefix}task_type" if prefix else "task_type", f"regression needs a number as every label; "
                   f"example {bad.id} has {bad.label!r}")
    if len(examples) < 2 * cfg.evaluation.folds:
        fail_field(source, "evaluation.folds", f"expected at most {len(examples) // 2} folds for {len(examples)} examples, "
                   f"got {cfg.evaluation.folds}")
    for i, obj in enumerate(cfg.distill.objectives):
        if get_spec(obj.name).reads_class_distribution:  # a softmax over outputs: meaningless on one output
            fail_field(source, f"distill.objectives[{i}].name", f"{obj.name} compares class distributions; a regression "
                       "head has one output: use logit_mse (the teacher's output) and hard_mse (the targets)")
    if cfg.teacher.finetuned is not None:
        head = teacher_dict.get("id2label") or {}
        heads = len(head) or 2  # transformers writes the head as id2label (2 labels when it says nothing)
        if heads != 1:
            fail_field(source, "teacher.finetuned", f"a regression teacher has one output, this one has {heads}")
    return ["score"]


def check_folds(cfg: FinetuneConfig, source: str, counts: dict[str, int]) -> None:
    label, smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if smallest < cfg.evaluation.folds:
        fail_field(source, "evaluation.folds", f"expected at most {smallest} folds: class {label!r} has only {smallest} "
                   f"examples, and every fold must hold each class; got {cfg.evaluation.folds}")


def check_split(cfg: FinetuneConfig, source: str, examples) -> None:
    """mode split: the task's three parts are there, and the labelled budget and the unlabeled texts fit its train
    part (the budget holding every class of it)."""
    parts = parts_of(examples)
    empty = [name for name, members in parts.items() if not members]
    if empty:
        fail_field(source, "evaluation.mode", f"mode split needs examples in each part of the task's split; "
                   f"{', '.join(empty)} has none (split_fractions {cfg.task.split_fractions})")
    train, e = parts["train"], cfg.evaluation
    budget = len(train) if e.labelled is None else e.labelled
    if budget > len(train):
        fail_field(source, "evaluation.labelled", f"expected at most {len(train)} (the examples of the task's train "
                   f"part), got {e.labelled}")
    classes = class_counts(train)
    if cfg.task_type != "regression" and budget < len(classes):
        fail_field(source, "evaluation.labelled", f"expected at least {len(classes)}, one example of each class of the "
                   f"train part ({sorted(classes)}), got {e.labelled}")
    if cfg.transfer.unlabeled > len(train) - budget:
        fail_field(source, "transfer.unlabeled", f"expected at most {len(train) - budget} (the train part's "
                   f"{len(train)} examples less the labelled {budget}), got {cfg.transfer.unlabeled}")


def check_student(cfg: FinetuneConfig, source: str, teacher_folder, teacher_dict: dict) -> tuple[int, int, int]:
    """(student layers, width, heads) of the model the method trains; a student folder's tokenizer must be the
    teacher's."""
    built = method_named(cfg.distill.method).student_shape
    if built is not None:
        return built(cfg, source, teacher_dict)
    if cfg.student.path is None:
        shape = cfg.student.shape
        check_against_teacher(source, teacher_dict, student=shape, student_path="student.shape")
        width = shape.hidden_size or teacher_dict["hidden_size"]
        heads = shape.num_attention_heads or teacher_dict["num_attention_heads"]
        if width % heads:
            fail_field(source, "student.shape.num_attention_heads", f"expected a divisor of the width {width}, got {heads}")
        return shape.num_layers, width, heads
    folder, student_dict = model_folder(source, "student.path", cfg.student.path)
    student_dict = shape_fields(student_dict)  # GPT-2 names its shape n_layer, n_embd, ...
    mine, theirs = tokenizer_fingerprint(folder), tokenizer_fingerprint(teacher_folder)
    if mine != theirs and not cfg.transfer.tokenize_per_model:
        fail_field(source, "student.path", f"{folder} has tokenizer {mine}, the teacher {teacher_folder} has {theirs}; "
                   "the transfer set holds the teacher's token ids, so the student must share its tokenizer (or set "
                   "transfer.tokenize_per_model: true: the set keeps its text and the student encodes it itself)")
    positions = student_dict.get("max_position_embeddings")
    if positions is not None and cfg.max_length > positions:
        fail_field(source, "max_length", f"expected at most the student's {positions} position embeddings, got "
                   f"{cfg.max_length}")
    return student_dict["num_hidden_layers"], student_dict["hidden_size"], student_dict["num_attention_heads"]


def plan_needs(cfg: FinetuneConfig, source: str, teacher_dict: dict, student: tuple[int, int, int]) -> dict:
    """Check every objective's inputs; return the hidden layers and pooling the transfer set must cache."""
    d = cfg.distill
    layers_t, (layers_s, _, heads_s) = teacher_dict["num_hidden_layers"], student
    try:
        layers = layer_offer(d.layer_map, layers_t, layers_s, student_heads=heads_s,
                             teacher_heads=teacher_dict["num_attention_heads"])
    except ValueError as err:
        fail_field(source, "distill.layer_map", str(err))
    cached = {"labels", "teacher_logits", "teacher_pooled"} | {f"teacher_hidden_{i}" for i in range(layers_t + 1)}
    if len(cfg.teacher.seeds) > 1:  # combined sets carry the combined logits only (kdlib.teachers.multi_teacher)
        cached = {"labels", "teacher_logits"}
    offer = Offer(online_teacher=d.online_teacher, cached=frozenset(cached),
                  peer=method_named(d.method).peer, token_level=False, **layers)
    try:
        plans = plan_objectives(d.objectives, offer)
    except ValueError as err:
        fail_objective(source, err, "distill.")
    if cfg.transfer.tokenize_per_model:  # the student's positions are not the teacher's: per-sequence targets only
        if d.online_teacher:
            fail_field(source, "distill.online_teacher", "with transfer.tokenize_per_model the teacher cannot run on the "
                       "student's token ids; use cached, per-sequence teacher outputs")
        for i, plan in enumerate(plans):
            if plan.scope != "batch" or any(PROVIDERS[n].teacher_reads - {"logits"} and n != "teacher_pooled"
                                            for n in plan.inputs):
                fail_field(source, f"distill.objectives[{i}]", f"{plan.name} compares the models position by position or "
                           "layer by layer; with transfer.tokenize_per_model their tokens differ: use per-sequence "
                           "objectives (kd_kl, hard_ce, logit_mse, rkd_*, ...)")
    hidden, pooled = set(), None
    for plan in plans:
        if "teacher_pooled" in plan.inputs:
            pooled = "mean"
        if any("hidden" in PROVIDERS[i].teacher_reads and i != "teacher_pooled" for i in plan.inputs):
            hidden |= set(plan.teacher_layers())
    if d.online_teacher:
        return {"hidden_layers": [], "pooled": None}
    return {"hidden_layers": sorted(hidden), "pooled": pooled}


def model_folder(source: str, field_name: str, ref: str) -> tuple[Path, dict]:
    """The model folder `ref` of field `field_name` and its config.json; a missing folder, a file or a folder that
    is no model is named by its field, so the user knows which of the config's paths to fix."""
    with field_named(source, field_name, catch=(ModelLoadError,), raise_as=ConfigError):
        folder = resolve_model_path(ref)
        return folder, check_model_folder(folder)


def task_examples(cfg: FinetuneConfig, source: str, field_prefix: str = "") -> list:
    """The task's examples; a file that is missing, a folder, not UTF-8 or malformed is named by its field and,
    from the reader, its file and line."""
    with field_named(source, f"{field_prefix}task.path", catch=(ReaderError,), raise_as=ConfigError):
        return read_examples(cfg.task)


def validate(cfg: FinetuneConfig, source: str, field_prefix: str = "") -> Setup:
    """All pre-flight checks (reads the task once and the model folders' config.json); `field_prefix` names the
    task's entry of a multi-task config in messages about its own fields (tasks[1].labels)."""
    examples = task_examples(cfg, source, field_prefix)
    counts = class_counts(examples)
    teacher_field = "teacher.init" if cfg.teacher.init is not None else "teacher.finetuned"
    teacher_folder, teacher_dict = model_folder(source, teacher_field, cfg.teacher.init or cfg.teacher.finetuned)
    if cfg.transfer.augment_model is not None:  # read only by the transfer step, after the teachers have trained
        model_folder(source, "transfer.augment_model", cfg.transfer.augment_model)
    check_against_teacher(source, teacher_dict, max_length=cfg.max_length)
    if cfg.task_type == "regression":
        labels = check_regression(cfg, source, examples, teacher_dict, field_prefix)
    else:
        labels = check_labels(cfg, source, sorted(counts), teacher_dict, field_prefix)
        if cfg.evaluation.mode == "folds":
            check_folds(cfg, source, counts)
    if cfg.evaluation.mode == "split":
        check_split(cfg, source, examples)
    if cfg.deploy.enabled and any(ex.text_b for ex in examples):
        fail_field(source, "deploy.enabled", "the int8 export reads one text per example; this task has text pairs "
                        "(text_b); set deploy.enabled: false")
    student = check_student(cfg, source, teacher_folder, teacher_dict)
    needs = plan_needs(cfg, source, teacher_dict, student)
    return Setup(labels=labels, needs=needs, examples=len(examples))
