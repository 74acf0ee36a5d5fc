"""Unit tests of the pretrain pieces, in one process with no DeepSpeed launch: sampler order, DeepSpeed
JSON generation and validation, config hash, rank discovery, RNG state files, Q/K/V capture and the
intermediate losses on real tiny models."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from kdlib.config import from_dict
from kdlib.engine import EngineConfig, OptimConfig, deepspeed_config, dist_env
from kdlib.errors import ConfigError
from kdlib.layer_maps import LayerMapConfig
from kdlib.objectives import ObjectiveConfig
from pretrain.config import PretrainConfig
from pretrain.distill import DistillModule, run_with_internals
from pretrain.internals import AttentionViews, capture_qkv
from pretrain.sampler import DistributedBatchSampler
from pretrain.state import restore_rng_state, rng_state_json


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
    assert _config(checkpoint_every=7, output_dir="elsewhere", log_every=5, keep_checkpoints=9).math_hash() == base
    assert _config(seed=1).math_hash() != base
    assert _config(steps=200).math_hash() != base  # decay_steps follows steps: the schedule changes
    fixed = {"optim": {"decay_steps": 300}}
    assert _config(steps=200, engine=fixed).math_hash() == _config(steps=100, engine=fixed).math_hash()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="online_teacher"):
        _config(objectives=[{"name": "hidden_mse"}], layer_map={"name": "uniform"})
    with pytest.raises(ConfigError, match="layer_map"):
        _config(objectives=[{"name": "hidden_mse"}], online_teacher=True)
    with pytest.raises(ConfigError, match=r"objectives\[0\].name"):
        _config(objectives=[{"name": "kd_kl"}])
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        _config(engine={"zero_stage": 4})


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
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, attn_implementation="eager")
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
        assert torch.allclose(views.probs(layer)[real], out.attentions[layer - 1][real], atol=1e-6)


def test_intermediate_losses_per_layer_pair_by_hand():
    teacher, student = _tiny(4, 16, 4, 0), _tiny(2, 8, 4, 1)
    student.train(False)
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    proj = torch.nn.ModuleDict({"hidden": torch.nn.Linear(8, 16)})
    objectives = [ObjectiveConfig("hidden_mse", weight=2.0), ObjectiveConfig("attention_kl")]
    pairs = LayerMapConfig("uniform").build(4, 2)
    assert pairs == [(2, 1), (4, 2)]
    module = DistillModule(student, proj, objectives, pairs)
    with torch.no_grad():
        _, t_int = run_with_internals(teacher, ids, mask, hidden=True, qkv=True, heads=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    total, parts = module(batch, t_int)
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    real = mask.bool().numpy()
    mse = []
    for t, s in pairs:
        diff = (proj["hidden"](s_out.hidden_states[s]) - t_out.hidden_states[t]).detach().numpy()[real]
        mse.append(np.mean(diff ** 2))
    assert parts["hidden_mse"].item() == pytest.approx(2.0 * np.mean(mse), rel=1e-5)
    kls = []
    for t, s in pairs:
        p_t, p_s = t_out.attentions[t - 1].detach().numpy(), s_out.attentions[s - 1].detach().numpy()
        per = []
        for b in range(2):
            n = int(real[b].sum())
            pt, ps = p_t[b, :, :n, :n], p_s[b, :, :n, :n]
            per.append((pt * (np.log(pt) - np.log(ps))).sum(-1))  # (H, n)
        kls.append(np.concatenate([x.reshape(-1) for x in per]).mean())
    assert parts["attention_kl"].item() == pytest.approx(np.mean(kls), rel=1e-4)
    assert total.item() == pytest.approx(parts["hidden_mse"].item() + parts["attention_kl"].item(), rel=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    from kdlib.errors import FingerprintMismatch
    from pretrain.state import TRAINER_STATE, read_trainer_state, trainer_state_json

    cfg = _config()
    (tmp_path / TRAINER_STATE).write_text(trainer_state_json(3, {"epoch": 0, "offset": 48, "seed": 0}, cfg,
                                                             cfg.math_hash(), 1000))
    assert read_trainer_state(tmp_path, _config(checkpoint_every=9).math_hash())["step"] == 3
    other = _config(seed=5).math_hash()
    with pytest.raises(FingerprintMismatch) as err:
        read_trainer_state(tmp_path, other)
    assert cfg.math_hash() in str(err.value) and other in str(err.value)
