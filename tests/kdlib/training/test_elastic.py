"""Elastic resume: a run checkpointed on 2 ranks continues on 1, and 1 -> 2, with `engine.global_batch` fixing
the global batch (grad_accum follows the world size).

Fast: the engine field and its errors, what enters the math hash, the refusal of another global batch, which
ZeRO stages load how at another world size, the seeding of a rank that has no RNG file. Slow (real DeepSpeed,
real processes through `python -m launch local`): ZeRO 0, 1 and 2 resumed at another world size against an
uninterrupted 2-rank run; ZeRO-3 refused in one line.

What equality holds. The rows of every step, micro-batch by micro-batch, are the same at any world size
(tests/kdlib/training/test_sampler.py), so what differs is only the order in which float32 gradients are
combined (ranks all-reduce what one rank accumulates). Bit for bit equal: step 1, and the first step after
resuming a checkpoint written at the reference's world size (the same weights, the same micro-batches, and a
two-term float64 sum of their losses). Every other step: equal to float32 rounding, `ROUNDING` relative (below).
The fixture's dropout is 0: with dropout each rank draws masks from its own stream (seed + rank), and one rank
doing two ranks' micro-batches draws other masks, which changes the losses by far more than rounding.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdlib.training.config as training_config
from kdlib.config import from_dict
from kdlib.errors import ConfigError, FingerprintMismatch, KDError
from kdlib.runtime.digests import verify_digests
from kdlib.runtime.metrics import read_metrics
from kdlib.training.checkpoints import needs_universal
from kdlib.training.deepspeed_engine import EngineConfig, deepspeed_config
from kdlib.training.loop import seed_new_rank, seed_rank
from kdlib.training.state import check_world
from pretrain.config import PretrainConfig
from tests.transfer_fixture import REPO, base_config, build_transfer_set, export_weights, stage_env, write_config

EPS32 = float(np.finfo(np.float32).eps)
# A float32 sum in another order differs by a few eps32 of its terms' magnitude; through a few Adam steps the
# loss and the weights move by the same relative order. 64 eps32 (7.6e-6) is far below what one training step
# changes here (asserted: > 1000x), so a lost optimizer state, schedule or row would not pass for rounding.
ROUNDING = 64 * EPS32


# ---------------------------------------------------------------- fast: the config, the hash, the checks


def test_global_batch_derives_grad_accum_per_world_size():
    engine = EngineConfig(micro_batch=4, global_batch=16)
    assert [engine.accumulation(w) for w in (1, 2, 4)] == [4, 2, 1]
    assert [engine.global_batch_for(w) for w in (1, 2, 4)] == [16, 16, 16]
    one, two = deepspeed_config(engine, 1, 10), deepspeed_config(engine, 2, 10)
    assert (one["train_batch_size"], one["gradient_accumulation_steps"]) == (16, 4)
    assert (two["train_batch_size"], two["gradient_accumulation_steps"]) == (16, 2)
    unset = EngineConfig(micro_batch=4, grad_accum=3)  # today's behaviour: the global batch grows with the world
    assert [unset.accumulation(w) for w in (1, 2)] == [3, 3] and unset.global_batch_for(2) == 24


def test_a_global_batch_that_does_not_split_is_refused_naming_the_field():
    engine = EngineConfig(micro_batch=4, global_batch=16)
    with pytest.raises(ValueError, match=r"global_batch: expected a multiple of micro_batch x world size = 4 x 3"):
        engine.accumulation(3)
    with pytest.raises(ConfigError) as err:
        deepspeed_config(engine, 3, 10, source="run.yaml")
    assert str(err.value).startswith("run.yaml: field 'engine.global_batch': expected a multiple of micro_batch x "
                                     "world size = 4 x 3 = 12") and "got 16" in str(err.value)
    base = {"teacher": {"path": "t"}, "transfer_set": "ts", "output_dir": "out", "objectives": [{"name": "kd_topk"}]}
    for engine_fields, field in (({"micro_batch": 4, "global_batch": 10}, "engine.global_batch"),
                                 ({"micro_batch": 4, "global_batch": 0}, "engine.global_batch"),
                                 ({"micro_batch": 4, "global_batch": 16, "grad_accum": 2}, "engine.grad_accum")):
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            from_dict(PretrainConfig, {**base, "engine": engine_fields}, "run.yaml")


def _config(**engine) -> PretrainConfig:
    return from_dict(PretrainConfig, {"teacher": {"path": "t"}, "transfer_set": "ts", "output_dir": "out",
                                      "objectives": [{"name": "kd_topk"}], "steps": 100, "engine": engine})


def test_the_hash_holds_global_batch_only_when_set(monkeypatch):
    hashed = []
    monkeypatch.setattr(training_config, "config_hash", lambda data: hashed.append(data) or "h")
    _config(micro_batch=4, grad_accum=2).math_hash()
    _config(micro_batch=4, global_batch=8).math_hash()
    unset, fixed = hashed
    assert "global_batch" not in unset["engine"]  # as before the field existed: older checkpoints still resume
    assert fixed["engine"]["global_batch"] == 8 and fixed["engine"]["grad_accum"] == 1  # no world size anywhere
    monkeypatch.undo()
    assert _config(micro_batch=4, global_batch=8).math_hash() != _config(micro_batch=4, global_batch=16).math_hash()


def test_a_checkpoint_of_another_global_batch_is_refused_with_both(tmp_path):
    saved = {"world_size": 2, "global_batch": 16}
    assert check_world(tmp_path, saved, 1, 16) == 2  # global_batch set: the world may change
    with pytest.raises(FingerprintMismatch) as err:
        check_world(tmp_path, saved, 1, 8)  # grad_accum fixed: half the batch on one rank
    message = str(err.value)
    assert "global batch of 16 sequences at world size 2" in message and "8 at world size 1" in message
    assert "engine.global_batch" in message
    assert check_world(tmp_path, {}, 3, 8) == 3  # a checkpoint from before the record: taken as this world size


def test_which_stages_load_how_at_another_world_size(tmp_path):
    assert [needs_universal(tmp_path, s, 2, 2) for s in (0, 1, 2, 3)] == [False] * 4
    assert [needs_universal(tmp_path, s, 2, 1) for s in (0, 1, 2)] == [False, True, True]
    assert [needs_universal(tmp_path, s, 1, 4) for s in (0, 1, 2)] == [False, True, True]
    with pytest.raises(KDError) as err:
        needs_universal(tmp_path, 3, 2, 1)
    assert "saved at world size 2, now 1" in str(err.value) and "ZeRO-3" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_rank_without_an_rng_file_gets_its_own_fixed_stream():
    def draws(fn, *args):
        fn(*args)
        return torch.rand(4).tolist(), np.random.rand(), random.random()

    assert draws(seed_new_rank, 0, 1, 50) == draws(seed_new_rank, 0, 1, 50)
    streams = [draws(seed_new_rank, 0, 1, 50), draws(seed_new_rank, 0, 2, 50), draws(seed_new_rank, 0, 1, 51),
               draws(seed_new_rank, 1, 1, 50), draws(seed_rank, 0, 1), draws(seed_rank, 0, 0)]
    assert len({json.dumps(s) for s in streams}) == len(streams)


# ---------------------------------------------------------------- slow: real runs on 2 ranks and 1


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    # 36 rows - 16 held out = 20 training rows: 2 steps of 8 per epoch, so the resume at step 2 is at an epoch's end
    return build_transfer_set(tmp_path_factory.mktemp("elastic"), rows=36, teacher_steps=10, dropout=0.0)


def launch(paths, out, nproc: int, steps: int, stage: int) -> subprocess.CompletedProcess:
    """`python -m launch local` with a fixed global batch of 8 (4 per micro-batch); the learning-rate decay is set
    explicitly, so `steps` is bookkeeping and a run of 2 steps may be continued to 4."""
    config = write_config(base_config(paths, out, steps=steps, checkpoint_every=2, eval_rows=16, **{
        "engine.zero_stage": stage, "engine.micro_batch": 4, "engine.grad_accum": 1, "engine.global_batch": 8,
        "engine.optim.decay_steps": 10}), out.parent / f"{out.name}-{steps}.yaml")
    return subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--config", str(config)],
                          cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def train_records(out) -> dict[int, dict]:
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # the step numbers continue across the resume
    return {r["step"]: r for r in records}


def trainer_state(out, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


def close(a: float, b: float) -> bool:
    return abs(a - b) <= ROUNDING * abs(b)


def compare(out, ref, first: int, then: int) -> None:
    mine, theirs = train_records(out), train_records(ref)
    parts = ("loss", "kd_topk", "mlm_ce")
    assert all(mine[1][p] == theirs[1][p] for p in parts)  # the same weights and micro-batches: bit for bit
    if first == 2:  # resumed from weights the reference's world size wrote: its first step is bit for bit too
        assert all(mine[3][p] == theirs[3][p] for p in parts)
    assert all(close(mine[s][p], theirs[s][p]) for s in (2, 3, 4) for p in parts), (mine, theirs)
    assert abs(theirs[4]["loss"] - theirs[3]["loss"]) > 1000 * ROUNDING * theirs[4]["loss"]  # the tolerance is tight
    assert [mine[s]["epoch"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    end, ref_end = trainer_state(out, 4), trainer_state(ref, 4)
    assert (end["world_size"], end["global_batch"]) == (then, 8)
    assert end["sampler"] == ref_end["sampler"] == {"epoch": 1, "offset": 16, "seed": 0}
    # the weights after the last update, on the model's scale: an element whose gradient is zero but for rounding
    # (an attention key bias, to which softmax is blind) moves by noise that Adam normalises, so not by
    # ROUNDING of its own (tiny) size
    a, b = export_weights(out / "export"), export_weights(ref / "export")
    assert a.keys() == b.keys()
    scale = max(t.abs().max().item() for t in b.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= ROUNDING * scale
    checkpoints = out / "checkpoints"
    verify_digests(checkpoints / "step-2")  # the saved step folder was read, never written
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.endswith(".py")) == \
        ["latest", "step-2", "step-4"]  # no universal copy left (the .py: DeepSpeed's recovery scripts)
    assert sorted(p.name for p in (checkpoints / "step-4").glob("rng-rank-*")) == \
        [f"rng-rank-{r:05d}.json" for r in range(then)]


@pytest.fixture(scope="module")
def uninterrupted(paths, tmp_path_factory):
    """stage -> the folder of an uninterrupted 2-rank run of 4 steps under that ZeRO stage (run once, on first use)."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp(f"zero{stage}") / "uninterrupted"
            ok(launch(paths, runs[stage], 2, 4, stage))
        return runs[stage]

    return run


@pytest.mark.slow
# each stage's load path once per direction that matters: ZeRO-0 as saved (2 -> 1), ZeRO-1 and 2 through the
# universal checkpoint (2 -> 1 and 1 -> 2); ZeRO-2 2 -> 1 -> 2 across hosts is in tests/launch/test_multinode.py
@pytest.mark.parametrize("stage, first, then", [(0, 2, 1), (2, 1, 2), (1, 2, 1)])
def test_a_run_continues_on_another_number_of_ranks(paths, uninterrupted, tmp_path, stage, first, then):
    ref = uninterrupted(stage)
    out = tmp_path / f"{first}-then-{then}"
    ok(launch(paths, out, first, 2, stage))  # stopped after 2 steps (a checkpoint at each)
    log = ok(launch(paths, out, then, 4, stage))  # `steps` is bookkeeping: the same run, continued to 4
    assert f"resumed from {out / 'checkpoints' / 'step-2'} (step 2, saved at world size {first}, now {then})" in log
    compare(out, ref, first, then)


@pytest.mark.slow
def test_zero3_at_another_world_size_is_refused_in_one_line(paths, tmp_path):
    out = tmp_path / "zero3"
    ok(launch(paths, out, 2, 2, 3))
    before = (out / "metrics.jsonl").read_text()
    proc = launch(paths, out, 1, 4, 3)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"{out / 'checkpoints' / 'step-2'}: saved at world size 2, now 1" in errors[0] and "ZeRO-3" in errors[0]
    assert (out / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".py")) == ["latest", "step-2"]
