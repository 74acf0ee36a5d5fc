"""The general-distillation config: teacher, transfer set, student, objectives, engine, schedule of the run.

Everything here is checked when the file is loaded; checks that need the teacher's files or the
transfer set's manifest run in `pretrain.validate` before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.config import config_hash, to_dict
from kdlib.engine import EngineConfig
from kdlib.layer_maps import LayerMapConfig
from kdlib.models import ModelConfig
from kdlib.objectives import ObjectiveConfig, validate_objectives
from kdlib.schemas import StudentConfig

OUTPUT_LOSSES = ("kd_topk", "mlm_ce")  # computed from the transfer set alone
HIDDEN_LOSSES = ("hidden_mse", "distilbert_cosine")  # per mapped layer pair, on hidden states
ATTENTION_LOSSES = ("attention_mse", "attention_kl", "value_relation_kl", "minilmv2_relations")  # per mapped pair, on Q/K/V
EMBEDDING_LOSSES = ("embedding_mse",)  # embedding-layer outputs (layer 0 of both models)
ONLINE_LOSSES = HIDDEN_LOSSES + ATTENTION_LOSSES + EMBEDDING_LOSSES
SUPPORTED_LOSSES = OUTPUT_LOSSES + ONLINE_LOSSES

# Fields that do not change the math of a step: a checkpoint may be resumed with other values.
# `steps` is here because the schedule's length enters the hash through the resolved decay_steps.
HASH_EXCLUDED = ("output_dir", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
                 "progress_bar", "threads", "resume")


@dataclass
class PretrainConfig:
    """General distillation of a masked-LM student from a cached transfer set (+ an optional online teacher)."""

    teacher: ModelConfig  # the teacher folder the transfer set was made with (fingerprints are checked)
    transfer_set: str  # transfer-set directory (shards/*.parquet + manifest.json) from data_pipeline
    output_dir: str  # run folder: checkpoints/, metrics.jsonl, loss_curve.png, export/
    objectives: list[ObjectiveConfig]  # weighted registered losses (kd_topk, mlm_ce, and online intermediate losses)
    student: StudentConfig = field(default_factory=StudentConfig)  # student shape and initialisation from teacher layers
    online_teacher: bool = False  # run the teacher on every batch (needed by intermediate losses)
    layer_map: Optional[LayerMapConfig] = None  # which teacher layer teaches which student layer (intermediate losses)
    engine: EngineConfig = field(default_factory=EngineConfig)  # DeepSpeed: ZeRO stage, precision, batch, optimizer
    steps: int = 1000  # optimizer steps of the run
    seed: int = 0  # model init, data order (numpy Generator(seed + epoch)) and dropout (seed + rank)
    eval_rows: int = 256  # the last rows of the transfer set: held out, never trained on, for top-1 agreement
    eval_every: int = 0  # steps between held-out evaluations (0: only at the start and the end)
    checkpoint_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # complete checkpoints kept (older ones are deleted)
    log_every: int = 1  # steps between metrics.jsonl records (each is one all-reduce of the loss parts)
    progress_bar: bool = True  # tqdm bar on rank 0
    threads: int = 0  # torch CPU threads per rank (0: torch's default)
    resume: bool = True  # continue from <output_dir>/checkpoints/latest when it exists

    def __post_init__(self) -> None:
        self.objectives = validate_objectives(self.objectives)
        for i, obj in enumerate(self.objectives):
            if obj.name not in SUPPORTED_LOSSES:
                raise ValueError(f"objectives[{i}].name: expected one of {list(SUPPORTED_LOSSES)} in pretraining, "
                                 f"got {obj.name!r}")
            if obj.name in ONLINE_LOSSES and not self.online_teacher:
                raise ValueError(f"online_teacher: objective {obj.name!r} needs the teacher's internals; "
                                 "expected true, got false")
            if obj.name in HIDDEN_LOSSES + ATTENTION_LOSSES and self.layer_map is None:
                raise ValueError(f"layer_map: objective {obj.name!r} needs a layer map (e.g. name: uniform), got null")
        if self.layer_map is not None and self.layer_map.name == "emd":
            raise ValueError("layer_map.name: emd is not supported by pretrain (use uniform, skip, last or explicit)")
        positive = {"steps": self.steps, "eval_rows": self.eval_rows, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        for name in ("eval_every", "keep_checkpoints", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")

    @property
    def global_batch_per_rank(self) -> int:
        return self.engine.micro_batch * self.engine.grad_accum

    def math_hash(self) -> str:
        """Hash of everything that changes what a step computes (HASH_EXCLUDED left out, decay resolved)."""
        data = {k: v for k, v in to_dict(self).items() if k not in HASH_EXCLUDED}
        data["engine"]["optim"]["decay_steps"] = self.engine.optim.decay_steps or self.steps
        return config_hash(data)
