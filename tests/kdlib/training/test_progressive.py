"""MobileBERT's progressive knowledge transfer (kdlib.training.progressive): the stage at each step, which objective
sites count in it, the rate of each depth, and a real `python -m pretrain` run (in this process, DeepSpeed
ZeRO-2 on CPU) of a bottleneck student in which, step by step, exactly the layer in training moves, the
output-level terms are 0 until the joint phase, and a run resumed inside the stages is bit-exact."""

from __future__ import annotations

import pytest
import torch

from kdlib.config import from_dict
from kdlib.training.checkpoints import consolidated_fp32_state_dict
from kdlib.errors import ConfigError
from kdlib.training.lr_groups import layer_depth, param_groups
from kdlib.runtime.metrics import read_metrics
from kdlib.training.progressive import ProgressiveConfig, ProgressiveTransfer, coverage_problem
from kdlib.training.objective_plan import plan_objective
from kdlib.training.providers import Offer
from pretrain.config import PretrainConfig
from pretrain.train import train
from pretrain.validate import validate
from tests.transfer_fixture import base_config, build_transfer_set, free_port

SHAPE = {"num_layers": 4, "architecture": "bottleneck", "init": "embeddings",
         "bottleneck": {"intra_size": 8, "feedforward_networks": 2}}  # teacher: 4 layers, width 32, 4 heads
OBJECTIVES = [{"name": "kd_topk", "weight": 1.0}, {"name": "hidden_mse", "weight": 1.0},
              {"name": "attention_kl", "weight": 1.0}]


def offer(pairs):
    return Offer(online_teacher=True, cached=frozenset({"topk_ids", "topk_logits", "teacher_lse", "mlm_labels"}), pairs=pairs,
                 teacher_layers=4, student_layers=4, student_heads=4, teacher_heads=4)


def test_stages_run_bottom_up_then_the_joint_phase():
    p = ProgressiveTransfer(ProgressiveConfig(steps_per_layer=3), num_layers=4)
    assert [p.layer_at(s) for s in range(14)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, None, None]
    assert p.stage_steps == 12


def test_a_stage_counts_only_the_layer_wise_sites_of_its_layer():
    pairs = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4))
    p = ProgressiveTransfer(ProgressiveConfig(steps_per_layer=1), num_layers=4)
    hidden, attention, kd = (plan_objective(n, offer(pairs)) for n in ("hidden_mse", "attention_kl", "kd_topk"))
    embedding = plan_objective("embedding_mse", offer(pairs))
    assert [(s.teacher_layer, s.student_layer) for s in p.sites(hidden, 1)] == [(0, 0), (1, 1)]  # embeddings feed 1
    assert [(s.teacher_layer, s.student_layer) for s in p.sites(hidden, 3)] == [(3, 3)]
    assert [(s.teacher_layer, s.student_layer) for s in p.sites(attention, 1)] == [(1, 1)]  # attention has no layer 0
    assert len(p.sites(embedding, 1)) == 1 and p.sites(embedding, 2) == []
    assert p.sites(kd, 2) == []  # an output-level term waits for the joint phase
    assert p.sites(kd, None) == kd.sites and p.sites(hidden, None) == hidden.sites


def test_rates_by_depth_freeze_below_hold_above_and_train_the_heads():
    p = ProgressiveTransfer(ProgressiveConfig(steps_per_layer=2, lower_layers_lr=0.1), num_layers=4)
    # depths: 0 embeddings, 1..4 layers, 5 heads and projections
    assert [p.rate_factor(d, 1) for d in range(6)] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert [p.rate_factor(d, 3) for d in range(6)] == [0.1, 0.1, 0.1, 1.0, 0.0, 1.0]
    assert [p.rate_factor(d, None) for d in range(6)] == [1.0] * 6
    groups = [{"lr": 2e-3, "depth": d} for d in range(6)]
    assert p.apply_rates(groups, step=4) == 2e-3  # step 4: layer 3
    assert [g["lr"] for g in groups] == [2e-4, 2e-4, 2e-4, 2e-3, 0.0, 2e-3]


def test_param_groups_by_depth_tag_each_group_and_keep_one_rate():
    model = torch.nn.ModuleDict({"embeddings": torch.nn.Linear(2, 2),
                                 "encoder": torch.nn.ModuleDict({"layer": torch.nn.ModuleList(
                                     [torch.nn.Linear(2, 2) for _ in range(2)])}), "head": torch.nn.Linear(2, 2)})
    groups = param_groups(model.named_parameters(), learning_rate=1e-3, weight_decay=0.01, num_layers=2, by_depth=True)
    assert [(g["depth"], g["weight_decay"], g["lr"]) for g in groups] == \
        [(d, wd, 1e-3) for d in range(4) for wd in (0.01, 0.0)]
    assert [layer_depth(n, 2) for n, _ in model.named_parameters()] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_frozen_depths_contribute_no_gradient_and_a_softened_freeze_keeps_them():
    def model_and_grads(transfer: ProgressiveTransfer):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"embeddings": torch.nn.Linear(3, 3),
                                     "encoder": torch.nn.ModuleDict({"layer": torch.nn.ModuleList(
                                         [torch.nn.Linear(3, 3) for _ in range(2)])}), "head": torch.nn.Linear(3, 3)})
        transfer.gate_gradients(model, 2)

        def grads(layer) -> list[bool]:  # has a gradient, per weight: embeddings, layer 0, layer 1, head
            model.zero_grad(set_to_none=True)
            transfer.current = layer
            h = model["embeddings"](torch.ones(2, 3))
            for block in model["encoder"]["layer"]:
                h = torch.tanh(block(h))
            model["head"](h).sum().backward()
            return [bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters() if n.endswith("weight")]

        return grads

    frozen = model_and_grads(ProgressiveTransfer(ProgressiveConfig(steps_per_layer=1), num_layers=2))
    assert frozen(1) == [True, True, True, True]  # stage 1: the embeddings train with layer 1
    assert frozen(2) == [False, False, True, True]  # stage 2: nothing below it; the head always
    assert frozen(None) == [True, True, True, True]
    soft = model_and_grads(ProgressiveTransfer(ProgressiveConfig(steps_per_layer=1, lower_layers_lr=0.1), num_layers=2))
    assert soft(2) == [True, True, True, True]  # softened: the rate is scaled, the gradient kept


def test_every_student_layer_needs_a_layer_wise_objective():
    pairs = ((2, 1), (4, 2))
    plans = [plan_objective("hidden_mse", offer(pairs)), plan_objective("kd_topk", offer(pairs))]
    assert coverage_problem(plans, 2) is None
    assert "student layers [3, 4] have none" in coverage_problem(plans, 4)
    assert "student layers [1, 2] have none" in coverage_problem(plans[1:], 2)


@pytest.mark.parametrize("field, value, message", [
    ("progressive.steps_per_layer", 0, "steps_per_layer: expected a positive integer"),
    ("progressive.lower_layers_lr", 2.0, r"lower_layers_lr: expected a number in \[0, 1\]"),
])
def test_bad_progressive_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveConfig(**{"steps_per_layer": 2, field.split(".")[1]: value})


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("progressive_fixture"), rows=96, teacher_steps=20, dropout=0.0)


def config(paths, out, steps: int, **extra):
    return from_dict(PretrainConfig, base_config(
        paths, out, student=SHAPE, objectives=OBJECTIVES, online_teacher=True, layer_map={"name": "uniform"},
        steps=steps, eval_rows=16, checkpoint_every=1, keep_checkpoints=10, progressive={"steps_per_layer": 1},
        **{"engine.grad_accum": 1, "engine.optim.learning_rate": 1e-2, "engine.optim.decay_steps": 12}, **extra))


def run(cfg, monkeypatch) -> int:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    return train(cfg, validate(cfg, "progressive.yaml"))


def by_depth(state: dict, num_layers: int) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for name, value in state.items():
        out.setdefault(layer_depth(name, num_layers), {})[name] = value
    return out


@pytest.mark.slow
def test_pretrain_trains_one_block_at_a_time_then_all_and_resumes_bit_exactly(paths, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(config(paths, out, steps=6), monkeypatch) == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["layer_in_training"] for r in records] == [1, 2, 3, 4, 0, 0]
    assert all(r["kd_topk"] == 0.0 for r in records[:4]) and all(r["kd_topk"] > 0 for r in records[4:])
    assert all(r["hidden_mse"] > 0 and r["attention_kl"] > 0 for r in records)

    states = {0: None}
    for step in range(1, 7):
        states[step] = by_depth(consolidated_fp32_state_dict(out / "checkpoints" / f"step-{step}"), 4)
    for step in range(2, 5):  # stage `step` (its layer is depth `step`): the others stay bit for bit
        before, after = states[step - 1], states[step]
        for depth in range(0, 5):
            same = all(torch.equal(before[depth][k], after[depth][k]) for k in before[depth])
            assert same == (depth != step), (step, depth)
    joint_before, joint_after = states[5], states[6]
    assert all(not torch.equal(joint_before[d][k], joint_after[d][k]) for d in (1, 4) for k in joint_before[d]
               if k.endswith("attention.self.query.weight"))  # every layer moves in the joint phase

    # stopped inside the stages (after step 3), resumed to 6: the same weights as the run never stopped
    resumed = tmp_path / "resumed"
    assert run(config(paths, resumed, steps=3), monkeypatch) == 0
    assert run(config(paths, resumed, steps=6), monkeypatch) == 0
    a = consolidated_fp32_state_dict(out / "checkpoints" / "step-6")
    b = consolidated_fp32_state_dict(resumed / "checkpoints" / "step-6")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pretrain_refuses_progressive_configs_that_cannot_work(paths, tmp_path):
    with pytest.raises(ConfigError, match=r"field 'progressive': gates each layer's gradients.*ZeRO-3"):
        from_dict(PretrainConfig, base_config(paths, tmp_path / "r", student=SHAPE, objectives=OBJECTIVES,
                                              online_teacher=True, layer_map={"name": "uniform"}, steps=8,
                                              progressive={"steps_per_layer": 2}, **{"engine.zero_stage": 3}))
    cfg = from_dict(PretrainConfig, base_config(paths, tmp_path / "r2", student=SHAPE, online_teacher=True,
                                                objectives=[{"name": "kd_topk", "weight": 1.0}],
                                                layer_map={"name": "uniform"}, steps=8,
                                                progressive={"steps_per_layer": 2}))
    with pytest.raises(ConfigError, match=r"field 'progressive': .*student layers \[1, 2, 3, 4\] have none"):
        validate(cfg, "p.yaml")
