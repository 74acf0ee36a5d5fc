"""`DistillationTrainer`: a `transformers.Trainer` that trains a student from a transfer set's cached targets (and an
online teacher, when the Distillation has one) with our objectives, by name.

What the Trainer wraps, places, shards (DDP under `accelerate launch`, or the Trainer's DeepSpeed integration) and
checkpoints is `DistilledModel`: the student and the Distillation together, so learned projections train and are
synchronised like the student's weights. `compute_loss` is the Distillation's total. Three things are made to be
what `python -m pretrain` does, so that the two train the same way:
  * batch order (`data_order="kdlib"`, the default): the stage's seed-driven order, each process taking the
    micro-batches the stage's rank of that index takes (kdlib.api.order);
  * optimizer and schedule (`optim=OptimConfig(...)`): the stage's AdamW groups and DeepSpeed's WarmupDecayLR
    (kdlib.api.schedule); without it the Trainer's own, from TrainingArguments;
  * dropout: each process seeds torch, numpy and random with seed + rank when training begins, as the stage does.
Each optimizer step's loss and terms, averaged over processes and micro-batches in float64, go to `history` and to
`<output_dir>/metrics.jsonl` in the stage's record format (kdlib.runtime.metrics), beside the Trainer's own logs.
`save_model` writes the student alone (projections stripped, as the stage's export strips them), loadable with
`from_pretrained`; a checkpoint also holds the Distillation's own weights (`distillation.safetensors`, when it has
any), so `train(resume_from_checkpoint=...)` continues with them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kdlib.api.distillation import Distillation
from kdlib.api.hf_dataset import transfer_set_info
from kdlib.api.order import StepOrder
from kdlib.api.schedule import WarmupDecay, adamw
from kdlib.api.transfer_set import Collator, base_transfer_set
from kdlib.runtime.metrics import MetricsWriter
from kdlib.training.deepspeed_engine import OptimConfig
from kdlib.training.export import STUDENT_PREFIX, student_state_dict
from kdlib.training.loop import seed_rank

LOSS_WEIGHTS = "distillation.safetensors"  # a checkpoint's Distillation weights (learned projections)


class DistilledModel(nn.Module):
    """The student and its Distillation as one module: forward(batch, step, total_steps) -> (total, terms)."""

    def __init__(self, student: nn.Module, distillation: Distillation):
        super().__init__()
        self.student, self.distillation = student, distillation

    def forward(self, batch: dict, step: int = 0, total_steps: int = 1):
        view = self.distillation.run_student(self.student, batch)
        return tuple(self.distillation(view, batch, step=step, total_steps=total_steps))


def collator_for(dataset, pad_id: int) -> Collator:
    """The collator of a transfer set (or a Subset of one), or of its `datasets` form (TransferSet.to_hf())."""
    ts = base_transfer_set(dataset)
    if ts is not None:
        return Collator(ts.manifest, pad_id)
    try:
        info = transfer_set_info(dataset)
    except (AttributeError, ValueError):
        raise ValueError("train_dataset: expected a TransferSet (or a Subset of one, or TransferSet.to_hf()); "
                         "for other data pass data_collator=") from None
    return Collator.from_info(info, pad_id)


class _StepRecords(TrainerCallback):
    """Seeds each process at the start, as the stage does; after each optimizer step, the step's loss and terms
    over every process (one reduce) into history and metrics.jsonl."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.rank_seeds:
            seed_rank(args.seed, self.trainer.accelerator.process_index)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_step(state.global_step)


class DistillationTrainer(Trainer):
    """`DistillationTrainer(model=student, args=TrainingArguments(...), distillation=Distillation(...),
    train_dataset=transfer_set)`; `.train()` as any Trainer. `optim`: train with `python -m pretrain`'s AdamW and
    schedule (engine.optim of a stage config) instead of the Trainer's. `data_order`: "kdlib" (the stage's
    seed-driven order, default) or "trainer" (the Trainer's shuffling). A TransferSet train_dataset (or a Subset
    of one) with no shard read yet is set to decode only the columns the objectives read, as the stage does."""

    loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by the accumulation steps

    def __init__(self, model: nn.Module = None, args=None, *, distillation: Distillation, train_dataset=None,
                 data_collator=None, optim: Optional[OptimConfig] = None,
                 data_order: Literal["kdlib", "trainer"] = "kdlib", rank_seeds: bool = True,
                 metrics_file: Optional[str] = "metrics.jsonl", **kwargs):
        if model is None or not isinstance(distillation, Distillation):
            raise ValueError("DistillationTrainer: expected model= (the student) and distillation= (a Distillation)")
        if data_order not in ("kdlib", "trainer"):
            raise ValueError(f"data_order: expected 'kdlib' or 'trainer', got {data_order!r}")
        if data_collator is None and train_dataset is not None:
            data_collator = collator_for(train_dataset, getattr(model.config, "pad_token_id", None) or 0)
        ts = base_transfer_set(train_dataset)
        if ts is not None:  # as the stage: decode only the columns the objectives read
            try:
                ts.read_only(distillation.reads)
            except RuntimeError:  # shards already read: they keep every column, which costs time, not values
                pass
        self.distillation, self.optim, self.data_order, self.rank_seeds = distillation, optim, data_order, rank_seeds
        self.history: list[dict] = []
        self._sums: Optional[torch.Tensor] = None
        self._micro, self._lr = 0, None
        super().__init__(model=DistilledModel(model, distillation), args=args, data_collator=data_collator,
                         train_dataset=train_dataset, **kwargs)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            distillation.dense_logits_only()  # ZeRO-3 partitions the output projection the chunked losses read
        self._metrics = None
        if metrics_file:
            self._metrics = MetricsWriter(Path(self.args.output_dir) / metrics_file,
                                          enabled=self.accelerator.is_main_process)
        self.add_callback(_StepRecords(self))

    @property
    def student(self) -> nn.Module:
        return self.model.student

    # ------------------------------------------------------------ data: every column reaches the collator
    def _remove_unused_columns(self, dataset, description: Optional[str] = None):
        return dataset  # the student's forward signature says nothing about the cached targets

    def _get_collator_with_removed_columns(self, data_collator, description: Optional[str] = None):
        return data_collator

    def get_train_dataloader(self) -> DataLoader:
        # (processes are counted by the accelerator: under the DeepSpeed integration on CPU, TrainingArguments'
        # world_size and process_index read 1 and 0 on every process)
        if self.data_order == "trainer":
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        order = StepOrder(len(self.train_dataset), micro_batch=self._train_batch_size,
                          grad_accum=self.args.gradient_accumulation_steps, world_size=self.accelerator.num_processes,
                          seed=self.args.seed)
        # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global generator, which
        # would shift every dropout mask after the stage's seeding (rank_seeds)
        loader = DataLoader(self.train_dataset, batch_sampler=order, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
                            generator=torch.Generator().manual_seed(self.args.seed))
        return self.accelerator.prepare(loader)  # process r takes every world_size-th micro-batch from r

    # ------------------------------------------------------------ optimizer and schedule
    def create_optimizer(self, model=None):
        if self.optim is None or self.optimizer is not None:
            return super().create_optimizer(model)
        self.optimizer = adamw(model if model is not None else self.model, self.optim,
                               self.student.config.num_hidden_layers)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.optim is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = WarmupDecay(optimizer if optimizer is not None else self.optimizer, self.optim,
                                        num_training_steps)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        total, terms = model(batch, step=self.state.global_step, total_steps=self.state.max_steps or 1)
        if model.training:
            if self._micro == 0:
                self._lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None
            values = torch.stack([total.detach()] + [terms[name].detach() for name in self.distillation.names])
            self._sums = values.double() if self._sums is None else self._sums + values.double()
            self._micro += 1
        return (total, terms) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """Evaluation: the Distillation's total on held-out rows (`evaluate()` reports it as eval_loss)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _finish_step(self, step: int) -> None:
        """The step's mean loss and terms over processes and micro-batches (the stage's numbers), recorded."""
        if self._sums is None:
            return
        sums = torch.cat([self._sums, torch.tensor([float(self._micro)], dtype=torch.float64,
                                                   device=self._sums.device)])
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        sums = sums.cpu()
        mean = (sums[:-1] / sums[-1]).tolist()
        record = {"kind": "train", "step": step, "loss": mean[0], **dict(zip(self.distillation.names, mean[1:]))}
        if self._lr is not None:
            record["lr"] = float(self._lr)
        self.history.append(record)
        if self._metrics is not None:
            self._metrics.write(record)
        self._sums, self._micro = None, 0

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.history:  # the last step's terms beside the Trainer's own loss
            logs.update({f"loss/{name}": self.history[-1][name] for name in self.distillation.names})
        super().log(logs, start_time)

    # ------------------------------------------------------------ saving: the student, as the stage exports it
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = state_dict if state_dict is not None else self.model.state_dict()
        student = self.accelerator.unwrap_model(self.model).student
        state = student_state_dict(state)
        tied = getattr(student, "_tied_weights_keys", None)
        for target, source in (tied.items() if isinstance(tied, dict) else ()):
            # a gathered state (DeepSpeed's) holds tied weights twice: keep the one from_pretrained reads
            if target in state and source in state and torch.equal(state[target], state[source]):
                del state[target]
        student.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_deepspeed_enabled:  # DeepSpeed's own checkpoint holds the whole module, and resumes from it
            return
        extra = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                 if not k.startswith(STUDENT_PREFIX)}
        if extra and self.args.should_save:  # learned projections: not part of the student, needed to resume
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_file(extra, str(folder / LOSS_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The student from the checkpoint's model.safetensors and the Distillation's weights beside it."""
        folder = Path(resume_from_checkpoint)
        state = {STUDENT_PREFIX + k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
        if (folder / LOSS_WEIGHTS).is_file():
            state.update(load_file(str(folder / LOSS_WEIGHTS)))
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        missing, unexpected = target.load_state_dict(state, strict=False)
        tied = {STUDENT_PREFIX + k for k in (getattr(target.student, "_tied_weights_keys", None) or {})}
        if unexpected or set(missing) - tied:
            raise ValueError(f"{folder}: the checkpoint does not fit (missing {sorted(set(missing) - tied)}, "
                             f"unexpected {sorted(unexpected)})")
