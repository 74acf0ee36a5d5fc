"""The batch order (kdlib/training/sampler.py) when the world size changes but the global batch does not: every
step takes the same rows at any world size, micro-batch for micro-batch, across an epoch boundary and after a
state_dict round trip from one world size to another (what a resume on another node count relies on)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdlib.training.sampler import DistributedBatchSampler

ROWS, GLOBAL, MICRO, SEED = 50, 12, 3, 7  # 4 steps per epoch, a 2-row tail skipped


def samplers(world: int) -> list[DistributedBatchSampler]:
    accum = GLOBAL // (MICRO * world)
    return [DistributedBatchSampler(ROWS, micro_batch=MICRO, grad_accum=accum, rank=r, world_size=world, seed=SEED)
            for r in range(world)]


def step_rows(ranks: list[DistributedBatchSampler]) -> list[list[int]]:
    """One optimizer step's micro-batches over all ranks, rank by rank (rank r's come after rank r-1's)."""
    return [micro for sampler in ranks for micro in sampler.next_step()]


def by_hand(step: int) -> list[int]:
    """Step `step` (0-based) as the sampler's docstring defines it: consecutive entries of Generator(seed + epoch)."""
    per_epoch = ROWS // GLOBAL
    epoch, index = divmod(step, per_epoch)
    perm = np.random.Generator(np.random.PCG64(SEED + epoch)).permutation(ROWS)
    return perm[index * GLOBAL:(index + 1) * GLOBAL].tolist()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_step_takes_the_same_rows_at_any_world_size(world):
    ranks = samplers(world)
    for step in range(10):  # steps 4 and 8 start epochs 1 and 2
        micro = step_rows(ranks)
        assert len(micro) == GLOBAL // MICRO and all(len(m) == MICRO for m in micro)
        flat = [row for m in micro for row in m]
        assert flat == by_hand(step)  # the union over ranks and micro-batches, in order
    assert ranks[0].state_dict() == {"epoch": 2, "offset": 2 * GLOBAL, "seed": SEED}
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)  # the state is the same on every rank


def test_the_micro_batches_themselves_match_across_world_sizes():
    """Not only the step's rows: micro-batch j of the step is the same rows (so per-micro-batch padding and loss
    normalisation agree too), whatever the split into ranks x grad_accum."""
    one, two, four = samplers(1), samplers(2), samplers(4)
    for _ in range(9):
        assert step_rows(one) == step_rows(two) == step_rows(four)


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_a_state_saved_at_one_world_size_continues_at_another(saved_world, resumed_world):
    uninterrupted = samplers(saved_world)
    before = [step_rows(uninterrupted) for _ in range(3)]
    state = json.loads(json.dumps(uninterrupted[0].state_dict()))  # rank 0's, as trainer_state.json carries it
    resumed = samplers(resumed_world)
    for sampler in resumed:
        sampler.load_state_dict(state)
    after = [step_rows(resumed) for _ in range(6)]  # crosses into epoch 1 at the second step, epoch 2 at the sixth
    expected = [step_rows(uninterrupted) for _ in range(6)]
    assert after == expected
    assert [[row for m in step for row in m] for step in before + after] == [by_hand(s) for s in range(9)]
    assert resumed[0].state_dict() == uninterrupted[0].state_dict() == {"epoch": 2, "offset": GLOBAL, "seed": SEED}
