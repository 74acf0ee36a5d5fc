"""What the objectives of a Python script can read, and the checks `python -m pretrain` runs before it trains, for
a teacher, a transfer set and a student handed over as Python objects.

The Offer (kdlib.training.providers) is built from the transfer set's manifest (`transfer_set_offer`), the layer
map (`layer_offer`) and the two models' shapes; every objective is then planned against it (`plan_objectives`),
so a loss whose inputs no one provides is refused here, naming what is missing and where it could come from, in
the stages' words. The teacher's fingerprints are checked against the manifest as the stages check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn
from transformers import AutoConfig

from kdlib.api.transfer_set import base_transfer_set
from kdlib.cache import reader
from kdlib.cache.manifest import Manifest, check_fingerprints
from kdlib.config import from_dict, to_dict
from kdlib.errors import ConfigError, KDError, fail_field
from kdlib.losses.objectives import ObjectiveConfig, validate_objectives
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.models import ModelConfig, load_model, resolve_model_path
from kdlib.students.layer_maps import LayerMapConfig
from kdlib.training.module import plan_objectives
from kdlib.training.objective_plan import ObjectivePlan, fail_objective, layer_offer, transfer_set_offer
from kdlib.training.providers import Offer

SOURCE = "Distillation"  # how errors name the configuration (a stage names its config file)


@dataclass
class _Objectives:
    objectives: list[ObjectiveConfig]  # the weighted losses, validated as a stage config's `objectives`

    def __post_init__(self) -> None:
        self.objectives = validate_objectives(self.objectives)


def objective_configs(objectives: Sequence[Union[ObjectiveConfig, dict]], source: str = SOURCE) -> list[ObjectiveConfig]:
    """ObjectiveConfigs from configs or plain mappings (`{"name": "kd_topk", "weight": 1.0, "params": {...}}`),
    checked as a config file's `objectives` is: ConfigError "<source>: field 'objectives[i].name': ..."."""
    if isinstance(objectives, (str, dict)) or not isinstance(objectives, Sequence):
        fail_field(source, "objectives", f"expected a list of objectives, got {type(objectives).__name__}")
    data = [to_dict(o) if isinstance(o, ObjectiveConfig) else o for o in objectives]
    return from_dict(_Objectives, {"objectives": data}, source).objectives


@dataclass
class Teacher:
    """The teacher as the losses see it: its shape, and the frozen model when it runs online."""

    layers: int
    width: int
    heads: int
    model: Optional[nn.Module] = None
    folder: Optional[Path] = None


@dataclass
class Planned:
    objectives: list[ObjectiveConfig]
    offer: Offer
    plans: list[ObjectivePlan]
    teacher: Teacher
    manifest: Optional[Manifest] = None
    student_config: Any = None


def _folder_of(model: nn.Module) -> Optional[Path]:
    ref = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(ref) if ref and Path(ref).is_dir() else None


def load_teacher(teacher: Union[str, nn.Module], task: str, source: str = SOURCE) -> tuple[nn.Module, Optional[Path]]:
    """A frozen teacher in eval mode: the given module, or the folder / `package:` reference loaded offline."""
    folder = None
    if isinstance(teacher, (str, Path)):
        try:
            folder = resolve_model_path(str(teacher))
            teacher = load_model(ModelConfig(path=str(teacher), task=task))
        except ConfigError:
            raise
        except (KDError, OSError, ValueError) as err:  # a KDError naming the folder, or transformers' own
            fail_field(source, "teacher", str(err))
    elif not isinstance(teacher, nn.Module):
        fail_field(source, "teacher", f"expected a model, a model folder or None, got {type(teacher).__name__}")
    teacher.requires_grad_(False)
    return teacher.eval(), folder or _folder_of(teacher)


def _teacher_shape(manifest: Optional[Manifest], model: Optional[nn.Module], folder: Optional[Path]) -> Teacher:
    config = getattr(model, "config", None)
    if config is None and manifest is not None:  # cached targets only: the manifest's record, the folder's heads
        ref = manifest.teacher.get("ref")
        try:
            config = AutoConfig.from_pretrained(str(resolve_model_path(ref)), local_files_only=True) if ref else None
        except (KDError, OSError, ValueError):  # the teacher folder is not on this machine: the manifest's shape
            config = None
    layers = getattr(config, "num_hidden_layers", None) or (manifest.teacher.get("num_layers") if manifest else 0)
    width = getattr(config, "hidden_size", None) or (manifest.teacher.get("hidden_size") if manifest else 0)
    return Teacher(int(layers or 0), int(width or 0), int(getattr(config, "num_attention_heads", 0) or 0), model, folder)


def _check_fingerprints(manifest: Manifest, where: str, teacher: Teacher, source: str) -> None:
    """As the stages do: the online teacher must be the one the transfer set was made with (when its folder is
    known, its weights and its tokenizer)."""
    if teacher.folder is None:
        return
    try:
        tokenizer = tokenizer_fingerprint(teacher.folder)
    except (KDError, OSError):  # a folder of weights without tokenizer files: the weights are still checked
        tokenizer = None
    try:
        check_fingerprints(manifest, where, teacher=model_fingerprint(teacher.folder), tokenizer=tokenizer)
    except KDError as err:  # FingerprintMismatch, naming both values; it stays one
        raise type(err)(f"{source}: field 'teacher': {err}") from None


def _check_student(manifest: Optional[Manifest], student_config, source: str) -> None:
    if manifest is None or student_config is None:
        return
    vocab = manifest.teacher.get("vocab_size")
    mine = getattr(student_config, "vocab_size", None)
    if vocab is not None and mine is not None and mine != vocab:
        fail_field(source, "student", f"vocab_size {mine}, but the transfer set's teacher has {vocab}: cached token "
                   "ids index the teacher's vocabulary (a student with its own tokenizer: python -m pretrain with "
                   "student.tokenizer)")
    positions = getattr(student_config, "max_position_embeddings", None)
    if positions is not None and manifest.max_length > positions:
        fail_field(source, "student", f"the transfer set holds rows of up to {manifest.max_length} tokens, but the "
                   f"student has {positions} position embeddings")


def is_task_set(manifest: Manifest) -> bool:
    """A set of labelled examples (data_pipeline's `task`), not of corpus rows."""
    cached = manifest.cached
    return bool(cached.get("labels")) or cached.get("task_type") is not None or manifest.config.get("task") is not None


def plan(objectives, *, student, teacher=None, transfer_set=None, cached: Optional[Sequence[str]] = None,
         layer_map=None, teacher_task: Optional[str] = None, token_level: Optional[bool] = None,
         source: str = SOURCE) -> Planned:
    """Every check the stages run before training, for Python objects; ConfigError / FingerprintMismatch naming
    the argument and what is wrong."""
    configs = objective_configs(objectives, source)
    student_config = getattr(student, "config", student)
    if not hasattr(student_config, "num_hidden_layers"):
        fail_field(source, "student", f"expected a transformers model or its config, got {type(student).__name__}")
    if isinstance(transfer_set, (str, Path)):  # a folder: its manifest is what the objectives are planned on
        transfer_set = reader.TransferSet(transfer_set, verify="lazy")
    elif transfer_set is not None:
        transfer_set = base_transfer_set(transfer_set)  # a TransferSet, or a Subset of one
        if transfer_set is None:
            fail_field(source, "transfer_set", "expected a TransferSet (or a Subset of one) or its folder")
    manifest = transfer_set.manifest if transfer_set is not None else None
    task = teacher_task or (manifest.teacher.get("task") if manifest else None) or "masked_lm"
    model, folder = load_teacher(teacher, task, source) if teacher is not None else (None, None)
    shape = _teacher_shape(manifest, model, folder)
    if manifest is not None:
        _check_fingerprints(manifest, str(transfer_set.path), shape, source)
    _check_student(manifest, student_config, source)
    if isinstance(layer_map, dict):
        layer_map = from_dict(LayerMapConfig, layer_map, f"{source}: layer_map")
    if layer_map is not None and layer_map.name == "emd":
        fail_field(source, "layer_map", "emd learns its layer weights from costs summed over ranks once per optimizer "
                   "step, which the training loop does (python -m pretrain); use uniform, skip, last or explicit")
    try:
        layers = layer_offer(layer_map, shape.layers, student_config.num_hidden_layers, teacher_heads=shape.heads,
                             student_heads=student_config.num_attention_heads)
    except ValueError as err:
        fail_field(source, "layer_map", str(err))
    keys, pooling = transfer_set_offer(manifest) if manifest is not None else (frozenset(cached or ()), "mean")
    if token_level is None:  # corpus rows predict per position (pretrain); a task set's rows one label each (finetune)
        token_level = manifest is None or not is_task_set(manifest)
    offer = Offer(online_teacher=model is not None, cached=frozenset(keys), peer=False, token_level=token_level,
                  pooling=pooling, causal=task == "causal_lm", **layers)
    try:
        plans = plan_objectives(configs, offer)
    except ValueError as err:
        fail_objective(source, err)
    return Planned(configs, offer, plans, shape, manifest, student_config)
