"""kdlib.api.order.StepOrder: once accelerate shards it over the processes, process r gets exactly the micro-batches
rank r of `python -m pretrain` trains on (kdlib.training.sampler), step by step, epoch after epoch."""

import pytest
from accelerate.data_loader import BatchSamplerShard

from kdlib.api.order import StepOrder
from kdlib.training.sampler import DistributedBatchSampler


@pytest.mark.parametrize("rows,micro,accum,world", [(256, 8, 2, 2), (100, 4, 3, 2), (50, 5, 1, 1), (97, 2, 2, 3)])
def test_each_process_gets_its_stage_ranks_micro_batches(rows, micro, accum, world):
    order = StepOrder(rows, micro_batch=micro, grad_accum=accum, world_size=world, seed=5)
    steps = rows // (micro * accum * world)
    assert len(order) == steps * accum * world
    for rank in range(world):
        stage = DistributedBatchSampler(rows, micro_batch=micro, grad_accum=accum, rank=rank, world_size=world, seed=5)
        shard = BatchSamplerShard(order, num_processes=world, process_index=rank)
        for epoch in range(3):
            order.set_epoch(epoch)
            expected = [batch for _ in range(steps) for batch in stage.next_step()]
            assert list(shard) == expected
            assert stage.state.epoch == epoch


def test_without_set_epoch_each_pass_is_the_next_epoch():
    order = StepOrder(64, micro_batch=4, grad_accum=2, world_size=2, seed=1)
    first, second = list(order), list(order)
    order.set_epoch(1)
    assert first != second and list(order) == second
    assert sorted(i for b in first for i in b) == list(range(64))
