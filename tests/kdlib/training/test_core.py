"""Unit tests of the training core (kdlib/training) and the engine module, in one process with no
DeepSpeed launch: sampler order, DeepSpeed JSON generation and validation, the math hash and resume
refusals, rank discovery, RNG state files, Q/K/V capture and intermediate losses on real tiny models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from kdlib.config import from_dict
from kdlib.runtime.process_group import dist_env
from kdlib.training.deepspeed_engine import EngineConfig, OptimConfig, deepspeed_config
from kdlib.errors import ConfigError, FingerprintMismatch
from kdlib.students.layer_maps import LayerMapConfig
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.training.providers import Offer
from kdlib.training.internals import AttentionViews, capture_qkv, run_model
from kdlib.training.module import DistillModule
from kdlib.training.sampler import DistributedBatchSampler
from kdlib.training.state import (TRAINER_STATE, read_trainer_state, restore_rng_state, rng_state_json,
                                  write_trainer_state)
from pretrain.config import PretrainConfig

EPS32 = float(np.finfo(np.float32).eps)


def test_sampler_takes_consecutive_slices_of_a_seeded_permutation():
    samplers = [DistributedBatchSampler(10, micro_batch=2, grad_accum=1, rank=r, world_size=2, seed=3) for r in (0, 1)]
    perm0, perm1 = np.random.default_rng(3).permutation(10), np.random.default_rng(4).permutation(10)
    steps = [[s.next_step() for s in samplers] for _ in range(3)]
    assert steps[0] == [[perm0[0:2].tolist()], [perm0[2:4].tolist()]]
    assert steps[1] == [[perm0[4:6].tolist()], [perm0[6:8].tolist()]]
    assert steps[2] == [[perm1[0:2].tolist()], [perm1[2:4].tolist()]]  # 2-row tail skipped, epoch 1
    assert samplers[0].state_dict() == {"epoch": 1, "offset": 4, "seed": 3}


def test_sampler_resumes_exactly_from_its_state():
    a = DistributedBatchSampler(50, micro_batch=3, grad_accum=2, rank=1, world_size=2, seed=7)
    for _ in range(5):
        a.next_step()
    b = DistributedBatchSampler(50, micro_batch=3, grad_accum=2, rank=1, world_size=2, seed=7)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next_step() for _ in range(9)] == [b.next_step() for _ in range(9)]
    first = DistributedBatchSampler(50, micro_batch=3, grad_accum=2, rank=1, world_size=2, seed=7).next_step()
    assert len(first) == 2 and all(len(m) == 3 for m in first)


def test_deepspeed_config_from_our_config():
    cfg = EngineConfig(zero_stage=3, precision="bf16", micro_batch=4, grad_accum=3, gradient_clipping=0.5,
                       optim=OptimConfig(learning_rate=1e-3, warmup_steps=9, decay_steps=100))
    ds = deepspeed_config(cfg, world_size=8, total_steps=50)
    assert ds["train_batch_size"] == 4 * 3 * 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True} and "fp16" not in ds
    sched = ds["scheduler"]["params"]
    assert sched["total_num_steps"] == 100 and sched["warmup_num_steps"] == 9
    assert sched["warmup_max_lr"] == 1e-3 and sched["warmup_min_lr"] == pytest.approx(1e-4)
    assert "optimizer" not in ds  # torch AdamW is passed in
    ds = deepspeed_config(EngineConfig(optim=OptimConfig(implementation="deepspeed")), 1, 10)
    assert ds["optimizer"]["type"] == "AdamW" and ds["scheduler"]["params"]["total_num_steps"] == 10


def test_user_deepspeed_json_is_checked_against_ours(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    cfg = EngineConfig(micro_batch=4, grad_accum=2, deepspeed_json=str(user))
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, world_size=2, total_steps=10, source="run.yaml")
    assert "train_batch_size=64" in str(err.value) and "16" in str(err.value) and "run.yaml" in str(err.value)
    user.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    merged = deepspeed_config(cfg, world_size=2, total_steps=10)
    assert merged["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert merged["gradient_accumulation_steps"] == 2
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16.enabled=True"):
        deepspeed_config(cfg, world_size=2, total_steps=10)


def _config(**changes) -> PretrainConfig:
    data = {"teacher": {"path": "t"}, "transfer_set": "ts", "output_dir": "out",
            "objectives": [{"name": "kd_topk"}], "steps": 100}
    data.update(changes)
    return from_dict(PretrainConfig, data)


def test_math_hash_ignores_bookkeeping_but_not_the_schedule():
    base = _config().math_hash()
    assert _config(checkpoint_every=7, output_dir="elsewhere", log_every=5, keep_checkpoints=9,
                   prefetch=0).math_hash() == base
    assert _config(seed=1).math_hash() != base
    assert _config(steps=200).math_hash() != base  # decay_steps follows steps: the schedule changes
    fixed = {"optim": {"decay_steps": 300}}
    assert _config(steps=200, engine=fixed).math_hash() == _config(steps=100, engine=fixed).math_hash()


@pytest.mark.parametrize("objective", [
    {"name": "kd_topk", "weight_schedule": {"name": "linear", "start": 1.0, "end": 0.0}},
    {"name": "kd_topk", "temperature_schedule": {"name": "cosine", "start": 4.0, "end": 1.0}},
    {"name": "teacher_annealing_ce"},  # reads step / total_steps itself
])
def test_steps_enter_the_hash_when_an_objective_reads_the_run_length(objective):
    fixed = {"optim": {"decay_steps": 300}}
    short, long = _config(steps=100, engine=fixed, objectives=[objective]), _config(steps=200, engine=fixed,
                                                                                     objectives=[objective])
    assert short.math_hash() != long.math_hash()


def test_a_weight_with_a_weight_schedule_multiplies():
    obj = ObjectiveConfig("kd_topk", weight=0.5, weight_schedule={"name": "linear", "start": 1.0, "end": 0.0})
    assert obj.weight_at(0, 10) == 0.5 and obj.weight_at(5, 10) == 0.25 and obj.weight_at(10, 10) == 0.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"objectives\[0\].name"):
        _config(objectives=[{"name": "kd_kll"}])
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        _config(engine={"zero_stage": 4})
    with pytest.raises(ConfigError, match="field 'steps'"):
        _config(steps=0)
    with pytest.raises(ConfigError, match="field 'prefetch'"):
        _config(prefetch=-1)


def test_rank_discovery_from_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    place = dist_env()
    assert (place.rank, place.world_size, place.local_rank) == (5, 8, 1)
    assert place.master_port == str(29500 + 234) and place.master_addr == "127.0.0.1"


def test_rng_states_round_trip_through_json():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    saved = rng_state_json()
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(saved)
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def _tiny(layers: int, hidden: int, heads: int, seed: int):
    """A tiny BERT with large initial weights, so attention is peaked and the losses are far from zero."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, attn_implementation="eager", initializer_range=0.5,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).eval()


def test_captured_attention_equals_the_models_own():
    model = _tiny(2, 16, 4, 0)
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with capture_qkv(model) as store:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    views = AttentionViews(store, 4, mask)
    for layer in (1, 2):
        real = mask[:, None, :, None].bool() & torch.ones(1, 4, 7, 7, dtype=torch.bool)
        scores = views.scores(layer).abs().max().item()
        # the model adds a large negative mask, we fill; both float32 softmaxes of scores of this size
        assert torch.allclose(views.probs(layer)[real], out.attentions[layer - 1][real], rtol=0,
                              atol=16 * EPS32 * (1 + scores))


def test_intermediate_losses_per_layer_pair_by_hand():
    """hidden_mse (weight 2, through the learned projection) and attention_kl per mapped pair, against a float64
    computation on the models' own float32 outputs; tolerances from the magnitude of the terms."""
    teacher, student = _tiny(4, 16, 4, 0), _tiny(2, 8, 4, 1)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    objectives = [ObjectiveConfig("hidden_mse", weight=2.0), ObjectiveConfig("attention_kl")]
    pairs = LayerMapConfig("uniform").build(4, 2)
    assert pairs == [(2, 1), (4, 2)]
    offer = Offer(online_teacher=True, cached=frozenset(), pairs=tuple(pairs), teacher_layers=4, student_layers=2)
    module = DistillModule(student, objectives, offer, teacher_width=16, seed=0)
    with torch.no_grad():
        t_view = run_model(teacher, ids, mask, hidden=True, qkv=True, heads=4)
    total, parts = module({"input_ids": ids, "attention_mask": mask}, t_view)
    with torch.no_grad():
        s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool().numpy()
    w = module.projections["hidden"].weight.detach().double().numpy()
    b = module.projections["hidden"].bias.detach().double().numpy()
    mse, scale = [], []
    for t, s in pairs:
        hs, ht = s_out.hidden_states[s].double().numpy()[real], t_out.hidden_states[t].double().numpy()[real]
        mse.append(np.mean((hs @ w.T + b - ht) ** 2))
        magnitude = np.abs(hs) @ np.abs(w).T + np.abs(b) + np.abs(ht)  # bounds |projected| + |teacher| per element
        scale.append(np.mean(magnitude ** 2))
    want = 2.0 * np.mean(mse)
    assert abs(parts["hidden_mse"].item() - want) <= 2.0 * 16 * EPS32 * np.mean(scale), (parts["hidden_mse"].item(), want)
    kls, spread = [], 0.0
    for t, s in pairs:
        p_t, p_s = t_out.attentions[t - 1].double().numpy(), s_out.attentions[s - 1].double().numpy()
        per = []
        for i in range(2):
            n = int(real[i].sum())
            pt, ps = p_t[i, :, :n, :n], p_s[i, :, :n, :n]
            per.append((pt * (np.log(pt) - np.log(ps))).sum(-1))  # (H, n)
            spread = max(spread, float(np.abs(np.log(pt) - np.log(ps)).max()))
        kls.append(np.concatenate([x.reshape(-1) for x in per]).mean())
    want_kl = np.mean(kls)
    scores = max(module_scores(student, ids, mask), module_scores(teacher, ids, mask))
    assert want_kl > 0.05  # far from zero: the check below is not vacuous
    assert abs(parts["attention_kl"].item() - want_kl) <= 32 * EPS32 * (1 + scores + spread), (parts["attention_kl"].item(), want_kl)
    terms = parts["hidden_mse"].item() + parts["attention_kl"].item()  # two positive float32 values
    assert abs(total.item() - terms) <= EPS32 * terms


def module_scores(model, ids, mask) -> float:
    """The largest attention score magnitude of a model on this batch (float32 rounding scales with it)."""
    with torch.no_grad(), capture_qkv(model) as store:
        model(input_ids=ids, attention_mask=mask)
    views = AttentionViews(store, 4, mask)
    return max(views.scores(layer).abs().max().item() for layer in store)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = _config()
    state = {"step": 3, "tokens_seen": 1000, "sampler": {"epoch": 0, "offset": 48, "seed": 0}, "loss_state": {},
             "config_hash": cfg.math_hash(), "steps": cfg.steps, "reads_total_steps": []}
    (tmp_path / TRAINER_STATE).write_text(write_trainer_state(state, cfg))
    assert read_trainer_state(tmp_path, _config(checkpoint_every=9).math_hash(), 100)["step"] == 3
    other = _config(seed=5).math_hash()
    with pytest.raises(FingerprintMismatch) as err:
        read_trainer_state(tmp_path, other, 100)
    assert cfg.math_hash() in str(err.value) and other in str(err.value)


def test_resume_with_new_steps_is_refused_when_a_schedule_reads_them(tmp_path):
    """The drift the old hash let through: explicit decay_steps, a weight schedule over total steps."""
    scheduled = [{"name": "kd_topk", "weight_schedule": {"name": "linear", "start": 1.0, "end": 0.0}}]
    fixed = {"optim": {"decay_steps": 300}}
    saved_cfg = _config(steps=100, engine=fixed, objectives=scheduled)
    state = {"step": 50, "tokens_seen": 1, "sampler": {}, "loss_state": {}, "config_hash": saved_cfg.math_hash(),
             "steps": 100, "reads_total_steps": ["kd_topk"]}
    (tmp_path / TRAINER_STATE).write_text(write_trainer_state(state, saved_cfg))
    longer = _config(steps=200, engine=fixed, objectives=scheduled)
    with pytest.raises(FingerprintMismatch) as err:
        read_trainer_state(tmp_path, longer.math_hash(), 200)
    message = str(err.value)
    assert saved_cfg.math_hash() in message and longer.math_hash() in message
    assert "steps changed from 100 to 200, and kd_topk read the run's total steps" in message
    unscheduled = _config(steps=200, engine=fixed)  # nothing reads steps: a longer run may resume
    assert unscheduled.math_hash() == _config(steps=100, engine=fixed).math_hash()
