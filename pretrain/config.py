"""The general-distillation config: teacher, transfer set, student, objectives, engine, and the loop settings
every stage shares (`kdlib.training.LoopConfig`: steps, seed, checkpoints, logging).

Everything here is checked when the file is loaded; checks that need the teacher's files or the
transfer set's manifest (which objectives can get their inputs) run in `pretrain.validate` before
any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.training.deepspeed_engine import EngineConfig, logit_chunk_size
from kdlib.students.layer_maps import LayerMapConfig
from kdlib.runtime.models import ModelConfig
from kdlib.losses.objectives import ObjectiveConfig, validate_objectives
from kdlib.training.progressive import ProgressiveConfig
from kdlib.schemas import StudentConfig
from kdlib.training.config import LoopConfig, math_hash


@dataclass
class PretrainConfig(LoopConfig):
    """General distillation of a masked-LM student from a cached transfer set (+ an optional online teacher)."""

    teacher: ModelConfig  # the teacher folder the transfer set was made with (fingerprints are checked)
    transfer_set: str  # transfer-set directory (shards/*.parquet + manifest.json) from data_pipeline
    objectives: list[ObjectiveConfig]  # weighted registered losses; each gets its inputs by name (README: "Objectives")
    student: StudentConfig = field(default_factory=StudentConfig)  # student shape and initialisation from teacher layers
    online_teacher: bool = False  # run the teacher on every batch (attention/Q-K-V losses, or uncached hidden states)
    layer_map: Optional[LayerMapConfig] = None  # which teacher layer teaches which student layer (emd: learned)
    engine: EngineConfig = field(default_factory=EngineConfig)  # DeepSpeed: ZeRO stage, precision, batch, optimizer
    eval_rows: int = 256  # the last rows of the transfer set: held out, never trained on, for top-1 agreement
    progressive: Optional[ProgressiveConfig] = None  # MobileBERT's layer-by-layer stages before joint training

    def __post_init__(self) -> None:
        super().__post_init__()
        self.objectives = validate_objectives(self.objectives)
        if self.eval_rows < 1:
            raise ValueError(f"eval_rows: expected a positive integer, got {self.eval_rows}")
        if self.progressive is not None:
            if self.engine.zero_stage == 3:
                raise ValueError("progressive: gates each layer's gradients on its parameters, which ZeRO-3 partitions "
                                 "away; use engine.zero_stage 0-2")
        try:
            logit_chunk_size(self.engine, self.objectives)
        except ValueError as err:
            raise ValueError(f"engine.{err}") from None

    def math_hash(self) -> str:
        """Hash of everything that changes what a step computes (kdlib.training.config.math_hash)."""
        return math_hash(self)
