"""Distillation from Python: the pieces a user's own training script needs, with no DeepSpeed and no stage CLI.

A transfer set as a torch Dataset or a `datasets.Dataset` (`TransferSet`), the weighted objectives as one loss
object that takes a student's outputs and a batch (`Distillation`), and a `transformers.Trainer` that trains
from them (`DistillationTrainer`; it also runs under `accelerate launch` and the Trainer's DeepSpeed integration).
What belongs here: thin adapters from those libraries' shapes to kdlib's own readers, objective plans, input
providers, sampler and optimizer groups, which they reuse rather than copy. Not here: new losses (kdlib.losses),
new inputs (kdlib.training.providers), or anything a stage needs (kdlib/training is the stages' core).

  transfer_set.py   TransferSet: kdlib.cache's reader as a torch Dataset, its collator, held-out split, info
  hf_dataset.py     the shards as a `datasets.Dataset` whose info carries the manifest's fingerprints and fidelity
  offer.py          what the losses can read (kdlib.training.providers.Offer) from a transfer set, teacher, student
  distillation.py   Distillation: objectives checked up front, (student outputs, batch) -> total and each term
  schedule.py       python -m pretrain's AdamW groups and warmup/linear-decay schedule, in plain torch
  order.py          python -m pretrain's seed-driven batch order as a sampler that accelerate shards
  trainer.py        DistillationTrainer: transformers.Trainer with compute_loss from a Distillation
"""

from kdlib.api.distillation import Distillation, Terms
from kdlib.api.transfer_set import Collator, TransferSet

__all__ = ["Collator", "Distillation", "Terms", "TransferSet", "DistillationTrainer"]


def __getattr__(name: str):
    # transformers.Trainer (and accelerate) take ~2 s to import: a script that only needs the Dataset or the loss
    # object does not pay for them
    if name == "DistillationTrainer":
        from kdlib.api.trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'kdlib.api' has no attribute {name!r}")
