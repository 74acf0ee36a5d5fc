"""TensorBoard events beside metrics.jsonl, read back with TensorBoard's own reader (EventAccumulator): every number of
every record at its step (float32, as TensorBoard stores scalars), the tags a user expects, NaN/inf kept, a resumed
session's values replacing a killed one's, nothing from a rank that does not write, and one real training run."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from kdlib.runtime.metrics import MetricsWriter, read_metrics
from tests.paths import REPO_ROOT


def accumulate(folder):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    return EventAccumulator(str(folder), size_guidance={SCALARS: 0}).Reload()  # 0: keep every point


def scalars(acc) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}, failing on a step shown twice."""
    out = {}
    for tag in acc.Tags()["scalars"]:
        points = acc.Scalars(tag)
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {p.step: p.value for p in points}
    return out


def same(shown: float, value: float) -> bool:
    with np.errstate(over="ignore"):  # 1e40 is inf in float32, as TensorBoard stores it
        expected = np.float32(value)
    return (math.isnan(shown) and np.isnan(expected)) or shown == expected


def train_record(step: int, loss: float, **extra) -> dict:
    return {"kind": "train", "step": step, "loss": loss, "kd_topk": loss * 0.6, "mlm_ce": loss * 0.8, "lr": 1e-3 * step,
            "tokens": 4096, "tokens_per_s": 12345.678 + step, "epoch": step // 3, **extra}


def test_every_number_of_every_record_is_a_scalar_at_its_step(tmp_path):
    records = [{"kind": "eval", "step": 0, "top1_agreement": 0.0123, "perplexity": 812.25},
               *[train_record(s, 7.5 / s) for s in range(1, 5)],
               train_record(5, float("nan"), layer_in_training=2, note="not a number"),
               {"kind": "train", "step": 6, "loss": float("inf"), "kd_topk": float("-inf"), "mlm_ce": 1e40, "lr": 0.0,
                "tokens": 0, "tokens_per_s": 0.0, "epoch": 2},
               {"kind": "eval", "step": 6, "top1_agreement": 0.25, "sst2/accuracy": 0.5, "improved": True}]
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for record in records:
        writer.write(record)
    writer.close()
    assert writer.events_path is None and len(list(tmp_path.glob("events.out.tfevents.*"))) == 1

    shown = scalars(accumulate(tmp_path))
    rename = {"kd_topk": "train/loss/kd_topk", "mlm_ce": "train/loss/mlm_ce", "loss": "train/loss", "lr": "train/lr",
              "tokens": "train/tokens", "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch",
              "layer_in_training": "train/layer_in_training"}
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key in ("kind", "step") or isinstance(value, str):
                continue
            tag = rename[key] if record["kind"] == "train" else f"eval/{key}"
            expected.setdefault(tag, {})[record["step"]] = value
    assert set(shown) == set(expected)
    assert {"train/loss", "train/loss/kd_topk", "train/lr", "train/tokens_per_s", "eval/top1_agreement"} <= set(shown)
    for tag, points in expected.items():
        assert set(shown[tag]) == set(points), tag
        for step, value in points.items():
            assert same(shown[tag][step], value), (tag, step, shown[tag][step], value)
    assert math.isnan(shown["train/loss"][5]) and shown["train/loss"][6] == math.inf
    assert shown["train/loss/kd_topk"][6] == -math.inf and shown["train/loss/mlm_ce"][6] == math.inf  # past float32
    assert read_metrics(tmp_path / "metrics.jsonl")[4]["loss"] == "nan"  # metrics.jsonl as before


def test_a_resumed_session_replaces_what_the_killed_one_wrote_after_its_checkpoint(tmp_path):
    killed = MetricsWriter(tmp_path / "metrics.jsonl")
    killed.write({"kind": "eval", "step": 0, "top1_agreement": 0.01})
    for step in range(1, 11):
        killed.write(train_record(step, 10.0 + step))
    killed.write({"kind": "eval", "step": 8, "top1_agreement": 0.08})
    first = killed.events_path  # no close(): a SIGKILL; every record was flushed as written

    resumed = MetricsWriter(tmp_path / "metrics.jsonl")  # from the checkpoint at step 6, in the same second
    for step in range(7, 13):
        resumed.write(train_record(step, 100.0 + step))
        if step == 8:
            resumed.write({"kind": "eval", "step": 8, "top1_agreement": 0.8})
    second = resumed.events_path
    resumed.close()
    assert sorted(p.name for p in tmp_path.glob("events.out.tfevents.*")) == [first.name, second.name]  # session order

    shown = scalars(accumulate(tmp_path))
    assert shown["train/loss"] == {s: np.float32(10.0 + s if s <= 6 else 100.0 + s) for s in range(1, 13)}
    assert shown["train/loss/kd_topk"][9] == np.float32((100.0 + 9) * 0.6)
    assert shown["eval/top1_agreement"] == {0: np.float32(0.01), 8: np.float32(0.8)}
    jsonl = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert {s: np.float32(v) for s, v in jsonl.items()} == shown["train/loss"]  # the same view as read_metrics
    killed.close()


def test_a_rank_that_does_not_write_and_the_switch_write_no_events(tmp_path):
    quiet = MetricsWriter(tmp_path / "rank1" / "metrics.jsonl", enabled=False)
    quiet.write(train_record(1, 1.0))
    quiet.close()
    assert not (tmp_path / "rank1").exists()
    off = MetricsWriter(tmp_path / "off" / "metrics.jsonl", tensorboard=False)
    off.write(train_record(1, 1.0))
    off.close()
    assert [p.name for p in (tmp_path / "off").iterdir()] == ["metrics.jsonl"]


def test_reading_metrics_does_not_import_tensorboard():
    code = ("import sys, tempfile, pathlib; from kdlib.runtime.metrics import MetricsWriter, read_metrics; "
            "d = pathlib.Path(tempfile.mkdtemp()); w = MetricsWriter(d / 'metrics.jsonl'); read_metrics(d / 'm'); "
            "assert not any(m.startswith('tensorboard') for m in sys.modules), 'imported'; "
            "w.write({'kind': 'eval', 'step': 0, 'x': 1.0}); assert 'tensorboard' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.slow
def test_a_real_training_run_writes_the_same_numbers_beside_its_metrics(tmp_path, monkeypatch):
    """The pretrain stage in this process (one rank, real DeepSpeed on CPU): its events file holds each train record's
    total and per-term losses, lr, tokens and tokens/s, and each evaluation, at their steps."""
    from kdlib.config import from_dict
    from pretrain.config import PretrainConfig
    from pretrain.train import train
    from pretrain.validate import validate
    from tests.transfer_fixture import base_config, build_transfer_set, free_port

    paths = build_transfer_set(tmp_path / "fixture", rows=96, teacher_steps=0)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "run"
    cfg = from_dict(PretrainConfig, base_config(paths, out, steps=4, eval_every=2, eval_rows=16, checkpoint_every=4,
                                                **{"engine.zero_stage": 0, "engine.grad_accum": 1}))
    assert train(cfg, validate(cfg, "test")) == 0

    [events] = out.glob("events.out.tfevents.*")
    shown = scalars(accumulate(out))
    train_records = read_metrics(out / "metrics.jsonl")
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    terms = [o.name for o in cfg.objectives]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4] and [r["step"] for r in evals] == [0, 2, 4]
    assert set(shown) == ({"train/loss", "train/lr", "train/tokens", "train/tokens_per_s", "train/epoch"}
                          | {f"train/loss/{t}" for t in terms} | {f"eval/{k}" for k in evals[0] if k not in ("kind", "step")})
    for record in train_records:
        step = record["step"]
        assert shown["train/loss"][step] == np.float32(record["loss"])
        for term in terms:
            assert shown[f"train/loss/{term}"][step] == np.float32(record[term])
        assert shown["train/lr"][step] == np.float32(record["lr"]) and record["lr"] > 0
        assert shown["train/tokens_per_s"][step] == np.float32(record["tokens_per_s"]) and record["tokens_per_s"] > 0
        assert shown["train/tokens"][step] == np.float32(record["tokens"])
    for record in evals:
        assert shown["eval/top1_agreement"][record["step"]] == np.float32(record["top1_agreement"])
