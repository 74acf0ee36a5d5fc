"""Shipped configs load; bad configs and foreign transfer sets stop before any process group starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdlib.config import from_dict, load_config
from kdlib.training.deepspeed_engine import deepspeed_config
from kdlib.errors import ConfigError, FingerprintMismatch
from kdlib.runtime.fingerprints import model_fingerprint
from pretrain.config import PretrainConfig
from pretrain.validate import validate
from tests.tiny_models import make_tiny_bert
from tests.transfer_fixture import REPO, base_config, build_transfer_set, stage_env, torchrun_command, write_config

SHIPPED = sorted((REPO / "configs").glob("pretrain_*.yaml"))


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("cfg_fixture"), rows=96, teacher_steps=0)


def test_there_are_shipped_configs():
    assert {p.name for p in SHIPPED} >= {"pretrain_demo.yaml", "pretrain_online_minilm.yaml", "pretrain_zero3_bf16.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_make_a_deepspeed_config(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path, PretrainConfig)
    ds = deepspeed_config(cfg.engine, world_size=8, total_steps=cfg.steps, source=str(path))
    assert ds["train_batch_size"] == cfg.engine.micro_batch * cfg.engine.grad_accum * 8
    assert ds["zero_optimization"]["stage"] == cfg.engine.zero_stage


@pytest.mark.slow
def test_bad_config_exits_2_naming_the_field(fixture_paths, tmp_path):
    cfg = base_config(fixture_paths, tmp_path / "out", **{"student.num_layers": 3, "student.init": "every_other"})
    config = write_config(cfg, tmp_path / "bad.yaml")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "field 'student.num_layers'" in proc.stderr and str(config) in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_config_under_torchrun_fails_before_deepspeed_starts(fixture_paths, tmp_path):
    config = write_config(base_config(fixture_paths, tmp_path / "out", **{"engine.micro_batch": 0}), tmp_path / "bad.yaml")
    proc = subprocess.run(torchrun_command(config), cwd=REPO, env=stage_env(), capture_output=True, text=True,
                          timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert log.count("field 'engine.micro_batch': expected a positive integer, got 0") == 2, log[-3000:]  # each rank
    assert "Initializing TorchBackend" not in log  # deepspeed.init_distributed never ran
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_transfer_set_of_another_teacher_is_refused(fixture_paths, tmp_path):
    other = make_tiny_bert(tmp_path / "other", task="masked_lm", layers=4, hidden=32, heads=4, seed=1)
    cfg = from_dict(PretrainConfig, base_config(fixture_paths, tmp_path / "out", **{"teacher.path": str(other)}))
    with pytest.raises(FingerprintMismatch) as err:
        validate(cfg, "run.yaml")
    message = str(err.value)
    assert model_fingerprint(other) in message and model_fingerprint(fixture_paths["teacher"]) in message


@pytest.mark.slow
def test_eval_rows_must_leave_a_global_batch(fixture_paths, tmp_path):
    cfg = from_dict(PretrainConfig, base_config(fixture_paths, tmp_path / "out", eval_rows=90))
    with pytest.raises(ConfigError, match="field 'eval_rows'.*leaves 6"):
        validate(cfg, "run.yaml")


@pytest.mark.slow
def test_attention_losses_need_matching_heads(fixture_paths, tmp_path):
    cfg = from_dict(PretrainConfig, base_config(
        fixture_paths, tmp_path / "out", online_teacher=True, layer_map={"name": "uniform"},
        objectives=[{"name": "attention_kl"}], **{"student.num_attention_heads": 2}))
    with pytest.raises(ConfigError, match=r"field 'objectives\[0\]'.*teacher's 4 heads, got 2 \(student.num_attention_heads\)"):
        validate(cfg, "run.yaml")
