"""kdlib.api.schedule: the stage's AdamW groups and DeepSpeed's WarmupDecayLR, in plain torch. The rates equal, as
floats, those DeepSpeed's own scheduler sets from the JSON `deepspeed_config` writes."""

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR
from torch import nn

from kdlib.api.schedule import WarmupDecay, adamw
from kdlib.training.deepspeed_engine import EngineConfig, OptimConfig, deepspeed_config
from kdlib.training.lr_groups import param_groups, scheduler_with_group_lrs


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(5, 3)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.head = nn.Linear(3, 5)


@pytest.mark.parametrize("optim,steps", [
    (OptimConfig(learning_rate=3e-3, warmup_steps=2), 6),
    (OptimConfig(learning_rate=5e-4, warmup_steps=1), 9),
    (OptimConfig(learning_rate=1e-3, warmup_steps=4, decay_steps=12), 20),
    (OptimConfig(learning_rate=1e-3, warmup_steps=3, layer_decay=0.5), 10),
])
def test_rates_equal_deepspeeds_scheduler(optim, steps):
    mine = adamw(Tiny(), optim, num_layers=2)
    theirs = torch.optim.AdamW(param_groups(Tiny().named_parameters(), learning_rate=optim.learning_rate,
                                            weight_decay=optim.weight_decay, layer_decay=optim.layer_decay,
                                            num_layers=2), lr=optim.learning_rate)
    block = scheduler_with_group_lrs(deepspeed_config(EngineConfig(optim=optim), 1, steps)["scheduler"],
                                     theirs.param_groups, optim.learning_rate)
    reference = WarmupDecayLR(theirs, **block["params"])
    schedule = WarmupDecay(mine, optim, steps)
    seen = []
    for _ in range(steps + 2):  # the rate each optimizer step uses, then one scheduler step, as both engines do
        assert [g["lr"] for g in mine.param_groups] == [g["lr"] for g in theirs.param_groups]
        seen.append(mine.param_groups[-1]["lr"])
        mine.step()
        theirs.step()
        schedule.step()
        reference.step()
    peak = optim.learning_rate  # the last group (the head) trains at the peak rate whatever the layer decay
    low = peak / (optim.warmup_steps + 1)
    # two steps at the minimum, warmup to the peak, decay back to the minimum (WarmupDecayLR decays the warmup's
    # increase, not the rate: it ends at warmup_min_lr, not 0)
    assert seen[0] == seen[1] == pytest.approx(low) and max(seen) == pytest.approx(peak)
    assert seen[-1] == pytest.approx(low) and min(seen[2:]) == pytest.approx(low)


def test_adamw_groups_and_hyperparameters_are_the_stages():
    optim = OptimConfig(learning_rate=2e-3, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    opt = adamw(Tiny(), optim, num_layers=2)
    assert [len(g["params"]) for g in opt.param_groups] == [4, 3]  # matrices (embedding, 3 weights), then the 3 biases
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="implementation"):
        adamw(Tiny(), OptimConfig(implementation="deepspeed"), num_layers=2)
