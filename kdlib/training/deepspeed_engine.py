"""DeepSpeed's JSON from our typed `EngineConfig`, and the DeepSpeed engine built from it.

One place turns the config into DeepSpeed's JSON (or validates a user's JSON against it) and one function
calls `deepspeed.initialize`. What belongs here: anything that decides how DeepSpeed is configured. Not here:
the process group (kdlib.runtime.process_group) and checkpoints (kdlib.training.checkpoints).
deepspeed and torch are imported inside the functions that use them: a config file is validated (this
module's dataclasses) without paying their import time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from kdlib.config import check_optimizer_fields
from kdlib.errors import ConfigError, ReaderError, fail_field
from kdlib.runtime.jsonl import json_document


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule (DeepSpeed WarmupDecayLR: linear warmup from lr/(warmup_steps+1), then linear decay back to that floor)."""

    learning_rate: float = 5e-4  # peak learning rate, reached after warmup_steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not applied to biases and LayerNorm weights)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment coefficients
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 1  # optimizer steps of linear warmup (DeepSpeed needs >= 1)
    decay_steps: Optional[int] = None  # the rate is back at its floor lr/(warmup_steps+1) here (null: the run's steps)
    layer_decay: float = 1.0  # layer-wise learning-rate decay: layer d of L trains at lr * layer_decay ** (L + 1 - d) (1: off)
    implementation: Literal["torch", "deepspeed"] = "torch"  # torch: torch.optim.AdamW passed in (no JIT build); deepspeed: the JSON optimizer (FusedAdam / CPUAdam, compiled at first use)

    def __post_init__(self) -> None:
        check_optimizer_fields(self, "learning_rate", "weight_decay")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {list(self.betas)}")
        check_optimizer_fields(self, "warmup_steps", min_warmup=1, warmup_why="DeepSpeed's WarmupDecayLR needs it")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay: expected a factor in (0, 1] (1: off), got {self.layer_decay}")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps: expected more than warmup_steps ({self.warmup_steps}), got {self.decay_steps}")


@dataclass
class EngineConfig:
    """How DeepSpeed runs the model: ZeRO stage, precision, batch shape, clipping, optimizer."""

    zero_stage: Literal[0, 1, 2, 3] = 2  # ZeRO partitioning: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 keep fp32 master weights; fp16 adds dynamic loss scaling
    micro_batch: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-batches accumulated per optimizer step (left at 1 when global_batch is set)
    global_batch: Optional[int] = None  # sequences per optimizer step at any world size: grad_accum becomes global_batch / (micro_batch x world size), so a run may resume on another node count (null: micro_batch x grad_accum x world size)
    gradient_clipping: float = 1.0  # global gradient-norm clip (0: off)
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when CUDA is available, else gloo
    deepspeed_json: Optional[str] = None  # a DeepSpeed JSON to start from; fields we also set must agree with ours
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and learning-rate schedule
    chunked_logits: Literal["auto", "on", "off"] = "auto"  # output losses from the head's input, chunk by chunk, never holding (positions, vocabulary) logits (kdlib/losses/chunked.py); auto: on unless ZeRO-3 or a loss reading the student's logits has no chunked twin
    logit_chunk_size: int = 256  # positions per chunk of the chunked output losses

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch: expected a positive integer, got {self.micro_batch}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum: expected a positive integer, got {self.grad_accum}")
        if self.gradient_clipping < 0:
            raise ValueError(f"gradient_clipping: expected >= 0, got {self.gradient_clipping}")
        if self.global_batch is not None:
            if isinstance(self.global_batch, bool) or not isinstance(self.global_batch, int) \
                    or self.global_batch < 1 or self.global_batch % self.micro_batch:
                raise ValueError(f"global_batch: expected a positive multiple of micro_batch ({self.micro_batch}), "
                                 f"got {self.global_batch!r}")
            if self.grad_accum != 1:
                raise ValueError(f"grad_accum: expected 1 (its default) when global_batch is set, which derives it "
                                 f"as global_batch / (micro_batch x world size), got {self.grad_accum}")
        if self.chunked_logits not in ("auto", "on", "off"):
            raise ValueError(f"chunked_logits: expected auto, on or off, got {self.chunked_logits!r}")
        if isinstance(self.logit_chunk_size, bool) or not isinstance(self.logit_chunk_size, int) \
                or self.logit_chunk_size < 1:
            raise ValueError(f"logit_chunk_size: expected a positive integer, got {self.logit_chunk_size!r}")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step at this world size (grad_accum, or derived from global_batch);
        ValueError naming global_batch when it is not a whole number of micro-batches on every rank."""
        if self.global_batch is None:
            return self.grad_accum
        per_micro_step = self.micro_batch * world_size
        if self.global_batch % per_micro_step:
            raise ValueError(f"global_batch: expected a multiple of micro_batch x world size = {self.micro_batch} x "
                             f"{world_size} = {per_micro_step} (every rank takes whole micro-batches), got "
                             f"{self.global_batch}")
        return self.global_batch // per_micro_step

    def global_batch_for(self, world_size: int) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch * self.accumulation(world_size) * world_size


def logit_chunk_size(engine: EngineConfig, objectives) -> int:
    """Positions per chunk for the chunked output losses, or 0 for dense logits (engine.chunked_logits).

    Chunking pays only when no loss needs the dense logits anyway, and ZeRO-3 partitions the output
    projection's weight outside its module's forward, where the chunked losses read it. "on" with
    either raises ValueError naming the field; "auto" then falls back to dense."""
    from kdlib.losses import get_chunked, get_spec  # loads torch: finetune/config.py imports this module, torch-free

    if engine.chunked_logits == "off":
        return 0
    dense = [o.name for o in objectives if {"student_logits", "logits_a"} & set(get_spec(o.name).inputs())
             and get_chunked(o.name) is None]
    problem = None
    if engine.zero_stage == 3:
        problem = "ZeRO-3 partitions the output projection's weight, which the chunked losses read; use zero_stage 0-2"
    elif dense:
        problem = f"{', '.join(dense)} read(s) the student's full logits and have no chunked twin"
    if problem is None:
        return engine.logit_chunk_size
    if engine.chunked_logits == "on":
        raise ValueError(f"chunked_logits: on, but {problem} (set auto or off)")
    return 0


def deepspeed_config(cfg: EngineConfig, world_size: int, total_steps: int, *, source: str = "<config>",
                     field_prefix: str = "engine") -> dict:
    """The DeepSpeed JSON for this run: ours, or the user's `deepspeed_json` checked against ours. A global_batch
    that does not split into whole micro-batches over `world_size` ranks is a ConfigError naming the field."""
    decay = cfg.optim.decay_steps or total_steps
    try:
        accum = cfg.accumulation(world_size)
    except ValueError as err:
        fail_field(source, f"{field_prefix}.global_batch", str(err).split(": ", 1)[1])
    ours: dict = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch * accum * world_size,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": {"stage": cfg.zero_stage},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            # DeepSpeed runs the first two optimizer steps at warmup_min_lr; 0 would waste them
            "warmup_min_lr": cfg.optim.learning_rate / (cfg.optim.warmup_steps + 1), "warmup_max_lr": cfg.optim.learning_rate, "warmup_num_steps": cfg.optim.warmup_steps,
            "total_num_steps": max(decay, cfg.optim.warmup_steps + 1), "warmup_type": "linear"}},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ours["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ours["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.optim.implementation == "deepspeed":
        ours["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.optim.learning_rate, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay}}
    if cfg.zero_stage == 3:
        # consolidated 16-bit weights at save time let an export skip zero_to_fp32 if a user prefers it
        ours["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if cfg.deepspeed_json is None:
        return ours
    return merge_user_json(ours, cfg.deepspeed_json, source, f"{field_prefix}.deepspeed_json")


_CHECKED = (  # (DeepSpeed key path, our config field that sets it)
    (("train_micro_batch_size_per_gpu",), "micro_batch"),
    (("gradient_accumulation_steps",), "grad_accum (or global_batch / (micro_batch * world_size))"),
    (("train_batch_size",), "micro_batch * grad_accum * world_size (or global_batch)"),
    (("gradient_clipping",), "gradient_clipping"),
    (("zero_optimization", "stage"), "zero_stage"),
    (("bf16", "enabled"), "precision"),
    (("fp16", "enabled"), "precision"),
)


def _get(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def merge_user_json(ours: dict, json_path: str, source: str, field_name: str) -> dict:
    """User JSON + our values for keys it leaves out; a key both set differently is a ConfigError naming both."""
    path = Path(json_path)
    if not path.is_file():
        raise ConfigError(f"{source}: field '{field_name}': file {path} not found")
    try:
        user = json_document(path, expect=dict, hint="")
    except ReaderError as err:
        raise ConfigError(f"{source}: field '{field_name}': {err}") from None
    for key_path, our_field in _CHECKED:
        theirs, mine = _get(user, key_path), _get(ours, key_path)
        if theirs is None or theirs == "auto":
            continue
        if mine is None:
            mine = False if key_path[-1] == "enabled" else None
        if theirs != mine:
            raise ConfigError(f"{source}: {path} sets {'.'.join(key_path)}={theirs!r} but the config's "
                              f"{our_field} gives {mine!r}; make them agree (or drop the key from the JSON)")
    merged = json.loads(json.dumps(user))
    for key, value in ours.items():
        if key not in merged or merged[key] == "auto":
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = {**value, **merged[key]}
    return merged


def initialize(module, ds_config: dict, optim: OptimConfig, num_layers: int = 0, by_depth: bool = False,
               rates: Optional[dict] = None):
    """deepspeed.initialize with our optimizer choice; returns the engine (optimizer and scheduler inside).

    Parameter groups come from kdlib.training.lr_groups: weight decay on matrices only, and with layer_decay < 1 one
    peak rate per depth (num_layers: the student's transformer layers), which the scheduler keeps per group;
    by_depth: per-depth groups tagged with their depth (progressive transfer); rates: {name regex: rate} for
    parameters with a rate of their own (kdlib.training.lr_groups)."""
    # torch and deepspeed (~3 s to import): finetune/config.py imports this module for EngineConfig, and config
    # validation and `python -m finetune --help` run without them
    import deepspeed
    import torch

    from kdlib.training import safe_load  # imports torch
    from kdlib.training.lr_groups import param_groups, scheduler_with_group_lrs

    groups = param_groups(module.named_parameters(), learning_rate=optim.learning_rate,
                          weight_decay=optim.weight_decay, layer_decay=optim.layer_decay, num_layers=num_layers,
                          by_depth=by_depth, rates=rates)
    if "scheduler" in ds_config:
        ds_config = {**ds_config, "scheduler": scheduler_with_group_lrs(ds_config["scheduler"], groups,
                                                                        optim.learning_rate)}
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=tuple(optim.betas), eps=optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           model_parameters=groups if optimizer is None else None, config=ds_config)
    safe_load.install(engine)  # its checkpoint files load with torch.load(weights_only=True)
    return engine
