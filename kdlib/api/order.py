"""`python -m pretrain`'s batch order for a DataLoader that accelerate shards over processes.

The order is kdlib.training.sampler.DistributedBatchSampler's: epoch e permutes the rows with numpy
`Generator(seed + e)`, each optimizer step takes the next micro_batch x grad_accum x world_size of them, and rank r
takes its slice, cut into grad_accum micro-batches. accelerate hands process r every batch whose position is r
modulo the world size, so this sampler lists, step after step and micro-batch after micro-batch, every rank's
micro-batch in rank order: after sharding, process r gets exactly the micro-batches rank r of `python -m pretrain`
trains on, in the same order. Epochs are whole numbers of steps (a short tail is skipped, as the stage skips it);
`set_epoch` (which the Trainer calls) makes the order a function of the epoch alone.
"""

from __future__ import annotations

from typing import Iterator, Optional

from kdlib.training.sampler import DistributedBatchSampler


class StepOrder:
    """A batch sampler (lists of row indices) of `num_rows` rows in the stage's order, for `world_size` processes."""

    def __init__(self, num_rows: int, *, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.ranks = [DistributedBatchSampler(num_rows, micro_batch=micro_batch, grad_accum=grad_accum, rank=r,
                                              world_size=world_size, seed=seed) for r in range(world_size)]
        self.batch_size, self.drop_last = micro_batch, True  # what accelerate's BatchSamplerShard reads
        self.grad_accum, self.world_size, self.seed = grad_accum, world_size, seed
        self.steps_per_epoch = num_rows // self.ranks[0].global_batch
        self._epoch: Optional[int] = None
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.grad_accum * self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch if self._epoch is not None else self._next_epoch
        self._epoch, self._next_epoch = None, epoch + 1
        for sampler in self.ranks:
            sampler.load_state_dict({"epoch": epoch, "offset": 0, "seed": self.seed})
        for _ in range(self.steps_per_epoch):
            steps = [sampler.next_step() for sampler in self.ranks]  # steps[r][j]: rank r's micro-batch j
            for j in range(self.grad_accum):
                for r in range(self.world_size):
                    yield steps[r][j]
