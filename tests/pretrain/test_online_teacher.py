"""Online-teacher intermediate losses through the real entry point: a narrower student (learned
projections inside the DeepSpeed module), ZeRO-3, 2 gloo processes; every loss logged and falling."""

from __future__ import annotations

import pytest
import json


from kdlib.runtime.metrics import read_metrics
from tests.transfer_fixture import base_config, build_transfer_set, export_weights, run_pretrain, write_config

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

ONLINE = ["kd_topk", "hidden_mse", "distilbert_cosine", "embedding_mse", "attention_kl", "value_relation_kl",
          "minilmv2_relations"]


def test_online_intermediate_losses_train_a_narrower_student(tmp_path):
    paths = build_transfer_set(tmp_path / "fixture", rows=192, teacher_steps=30)
    out = tmp_path / "online"
    objectives = [{"name": n, "weight": 1.0} for n in ONLINE]
    objectives[ONLINE.index("minilmv2_relations")]["params"] = {"relation_heads": 4}
    cfg = base_config(paths, out, online_teacher=True, layer_map={"name": "uniform"}, objectives=objectives,
                      steps=8, checkpoint_every=100, **{"engine.zero_stage": 3, "student.hidden_size": 16,
                                                        "student.intermediate_size": 32, "eval_rows": 32})
    proc = run_pretrain(write_config(cfg, tmp_path / "online.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 9))
    for name in ONLINE:
        values = [r[name] for r in train]
        assert all(v > 0 for v in values), (name, values)
    assert abs(train[0]["loss"] - sum(train[0][n] for n in ONLINE)) < 1e-5
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["hidden_mse"] < train[0]["hidden_mse"]
    weights = export_weights(out / "export")
    assert not any("projection" in k for k in weights)
    assert json.loads((out / "export" / "config.json").read_text())["hidden_size"] == 16
