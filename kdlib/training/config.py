"""The settings every training stage shares, and the one definition of "what changes the math".

A stage's config inherits `LoopConfig` (keyword-only fields, so the stage's own required fields come
first). `math_hash` is what a checkpoint is resumed under: everything in the config except the
bookkeeping fields below, with the learning-rate decay resolved, and with `steps` included whenever
an objective reads the run's length (a weight or temperature schedule, teacher annealing). A resume
whose hash differs is refused, naming both hashes. The world size is not in the config, so not in the
hash: with `engine.global_batch` set it does not change the math (grad_accum follows it); without it,
the global batch does change with it, which the trainer refuses separately (kdlib.training.state).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.config import config_hash, to_dict
from kdlib.schemas import Architecture
from kdlib.training.early_stop import EarlyStoppingConfig

# Fields that do not change what a step computes: a checkpoint may be resumed with other values.
# `steps` is here only as long as nothing reads it: the LR decay enters the hash resolved (decay_steps),
# and objectives that read total_steps put `steps` back in (see math_hash).
BOOKKEEPING = ("output_dir", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
               "progress_bar", "threads", "resume", "prefetch")


@dataclass(kw_only=True)
class LoopConfig:
    """Length, cadence and bookkeeping of a training run (shared by every stage)."""

    output_dir: str  # run folder: checkpoints/, metrics.jsonl, loss_curve.png, export/
    steps: int = 1000  # optimizer steps of the run
    seed: int = 0  # model init, data order (numpy Generator(seed + epoch)) and dropout (seed + rank)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the start and the end)
    checkpoint_every: int = 500  # steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # complete checkpoints kept (older ones are deleted)
    log_every: int = 1  # steps between metrics.jsonl records
    progress_bar: bool = True  # tqdm bar on rank 0 (quiet when stderr is not a terminal)
    threads: int = 0  # torch CPU threads per rank (0: torch's default)
    resume: bool = True  # continue from <output_dir>/checkpoints/latest when it exists
    prefetch: int = 2  # optimizer steps of batches decoded ahead on a background thread (0: load inline)
    early_stopping: Optional[EarlyStoppingConfig] = None  # stop on a held-out metric; the best weights are exported
    architectures: dict[str, Architecture] = field(default_factory=dict)  # more rows of the Q/K/V table by model_type (kdlib.training.architectures)

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("seed", "eval_every", "keep_checkpoints", "threads", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.early_stopping is not None and not self.eval_every:
            raise ValueError("early_stopping: needs eval_every > 0 (the metric is read at every evaluation)")


def reads_total_steps(config) -> list[str]:
    """Names of the objectives whose value depends on the run's length."""
    return [o.name for o in getattr(config, "objectives", []) if o.reads_total_steps()]


def math_hash(config) -> str:
    """Hash of everything that changes what a step computes (see the module docstring)."""
    data = {k: v for k, v in to_dict(config).items() if k not in BOOKKEEPING}
    for name in ("early_stopping", "progressive", "adashare", "policy"):  # absent and unset hash alike: older checkpoints stay resumable
        if data.get(name, 0) is None:
            del data[name]
    if data.get("architectures") == {}:  # no rows added: hashes as before the option existed
        del data["architectures"]
    for shape in (data.get("student"), data.get("student_shape")):  # the plain BERT shape hashes as before
        if isinstance(shape, dict) and shape.get("architecture") == "bert" and shape.get("bottleneck") is None:
            shape.pop("architecture", None)
            shape.pop("bottleneck", None)
        if isinstance(shape, dict):
            for name in ("config", "tokenizer"):  # the teacher's, as before these options existed
                if name in shape and shape[name] is None:
                    del shape[name]
    engine = data.get("engine")
    if engine is not None:
        engine["optim"]["decay_steps"] = config.engine.optim.decay_steps or config.steps
        if engine["optim"].get("layer_decay") == 1.0:  # off hashes as before the option existed
            del engine["optim"]["layer_decay"]
        for name in ("chunked_logits", "logit_chunk_size"):  # how the output layer is computed, not what
            engine.pop(name, None)
        if engine.get("global_batch", 0) is None:  # unset hashes as before the option existed
            del engine["global_batch"]
    if reads_total_steps(config):
        data["steps"] = config.steps
    return config_hash(data)
