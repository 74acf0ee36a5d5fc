"""Deterministic distributed batch order, resumable from (epoch, offset, seed).

Epoch e visits the training rows in the order of numpy `Generator(seed + e).permutation(n)`. A
global batch is the next `micro_batch * grad_accum * world_size` consecutive entries of that order;
rank r takes its contiguous slice of `micro_batch * grad_accum` entries and cuts it into
`grad_accum` micro-batches. An epoch's tail shorter than a global batch is skipped, so every step
sees a full batch. The state is three integers: saving and restoring it reproduces the order exactly,
independent of how many steps ran before.

The state does not depend on the world size, and neither does the order when the global batch stays fixed
(`engine.global_batch`): step k takes the same consecutive entries at any world size, and micro-batch j of
the step (counting rank by rank) is the same rows, so a run resumed on another node count continues with
the rows the uninterrupted run would have taken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class SamplerState:
    epoch: int = 0  # current pass over the training rows
    offset: int = 0  # position in this epoch's permutation of the next global batch
    seed: int = 0  # base seed; epoch e uses Generator(seed + e)


class DistributedBatchSampler:
    """Yields, per optimizer step, this rank's `grad_accum` micro-batches of row indices."""

    def __init__(self, num_rows: int, *, micro_batch: int, grad_accum: int, rank: int, world_size: int, seed: int):
        self.num_rows = num_rows
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        if num_rows < self.global_batch:
            raise ValueError(f"{num_rows} training rows cannot fill one global batch of {self.global_batch} "
                             f"(micro_batch {micro_batch} x grad_accum {grad_accum} x world_size {world_size})")
        self.state = SamplerState(seed=seed)
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64(self.state.seed + epoch)).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def next_step(self) -> list[list[int]]:
        """This rank's micro-batches for the next optimizer step; advances the state."""
        if self.state.offset + self.global_batch > self.num_rows:
            self.state.epoch, self.state.offset = self.state.epoch + 1, 0
        perm = self._permutation(self.state.epoch)
        per_rank = self.micro_batch * self.grad_accum
        start = self.state.offset + self.rank * per_rank
        mine = perm[start:start + per_rank].tolist()
        self.state.offset += self.global_batch
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.state.seed:
            raise ValueError(f"sampler seed {state['seed']} in the checkpoint differs from the config's {self.state.seed}")
        self.state = SamplerState(epoch=int(state["epoch"]), offset=int(state["offset"]), seed=int(state["seed"]))
