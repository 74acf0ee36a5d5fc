"""Checkpoint files load with torch.load(weights_only=True) and a minimal allow-list (kdlib/training/safe_load.py).

Fast: the allow-list, DeepSpeed's objects round-tripping through it, a planted pickle refused by the checkpoint
engine and by the torch.load wrapper without running. Slow (real DeepSpeed, `python -m pretrain` in one
process, ZeRO-2): a resume through the safe engine is bit for bit the uninterrupted run; a planted pickle whose
digests were rewritten to match (so the digest check passes) is refused by the loader, on resume and at export,
naming the file and the global, and never runs.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlib.errors import KDError
from kdlib.runtime.digests import verify_digests, write_digests
from kdlib.runtime.metrics import read_metrics
from kdlib.training.safe_load import (ALLOWED_GLOBALS, allowed_globals, load_weights_only,
                                      safe_checkpoint_engine_class, weights_only_loads)
from tests.transfer_fixture import REPO, base_config, build_transfer_set, export_weights, stage_env, write_config


class _Payload:
    """A planted pickle: unpickling it touches a marker file (standing in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """A file in torch.save's own format, as a real checkpoint file is; its pickle calls getattr(Path, "touch")."""
    torch.save({"module": _Payload(marker)}, path)


PLANTED = r"needs the global getattr"  # the first global the payload's pickle names (protocol 2: getattr(Path, 'touch'))


# ---------------------------------------------------------------- fast


def test_the_allow_list_is_the_minimum_deepspeed_checkpoints_need():
    # read from the "Unsupported global" errors of checkpoints saved by our loop, ZeRO 0-3 x fp32/bf16/fp16
    assert set(ALLOWED_GLOBALS) == {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
    assert len(ALLOWED_GLOBALS) == 4 and all(isinstance(g, type) for g in allowed_globals())


def test_deepspeed_objects_round_trip_and_nothing_stays_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(2.0**16, 2, 1.0, 2, False), "stage": ZeroStageEnum(2),
                "mappings": [{"w": fragment_address(numel=6, start=3)}], "state": {0: torch.arange(4.0)}}, path)
    loaded = safe_checkpoint_engine_class()().load(str(path), map_location="cpu")
    assert loaded["stage"] is ZeroStageEnum.gradients and loaded["mappings"][0]["w"] == fragment_address(6, 3)
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["dynamic"].cur_scale == 2.0**16
    assert torch.equal(loaded["state"][0], torch.arange(4.0))
    assert not set(allowed_globals()) & set(torch.serialization.get_safe_globals())  # for our load only


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_planted_pickle_is_refused_by_name_and_never_runs(tmp_path):
    marker, path = tmp_path / "payload-ran", tmp_path / "mp_rank_00_model_states.pt"
    plant(path, marker)
    with pytest.raises(KDError, match=rf"mp_rank_00_model_states\.pt: {PLANTED}"):
        safe_checkpoint_engine_class()().load(str(path), map_location="cpu")
    real = torch.load
    with pytest.raises(KDError, match=rf"mp_rank_00_model_states\.pt: {PLANTED}"):
        with weights_only_loads():
            torch.load(path, map_location="cpu", weights_only=False)  # as DeepSpeed's zero_to_fp32 calls it
    assert torch.load is real  # put back, also after an error
    raw = tmp_path / "raw.pt"  # a plain pickle (protocol 4): refused at its first opcode torch does not take
    raw.write_bytes(pickle.dumps({"module": _Payload(marker)}))
    with pytest.raises(KDError, match=r"raw\.pt: does not load as weights only \(Unsupported operand"):
        load_weights_only(raw)
    assert not marker.exists()


# ---------------------------------------------------------------- slow: real runs, one process, ZeRO-2

RUN = {"engine.zero_stage": 2, "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "eval_rows": 16}


def pretrain_one_process(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe_load")
    paths = build_transfer_set(root / "fixture", rows=96, teacher_steps=2)
    out = root / "reference"
    proc = pretrain_one_process(write_config(base_config(paths, out, **RUN), root / "reference.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return paths, out


def copy_step(ref: Path, run: Path, step: int) -> Path:
    folder = run / "checkpoints" / f"step-{step}"
    shutil.copytree(ref / "checkpoints" / f"step-{step}", folder)
    (run / "checkpoints" / "latest").write_text(f"step-{step}\n")
    return folder


@pytest.mark.slow
def test_a_resume_through_the_safe_engine_is_bit_exact(reference, tmp_path):
    paths, ref = reference
    run = tmp_path / "resumed"
    copy_step(ref, run, 2)
    proc = pretrain_one_process(write_config(base_config(paths, run, **RUN), tmp_path / "resumed.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    mine = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    theirs = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl")}
    assert sorted(mine) == [3, 4] and all(mine[s] == theirs[s] for s in mine)  # exact floats
    a, b = export_weights(run / "export"), export_weights(ref / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_with_rewritten_digests_is_refused_by_the_loader(reference, tmp_path, name):
    paths, ref = reference
    marker, run = tmp_path / "payload-ran", tmp_path / "tampered"
    folder = copy_step(ref, run, 2)
    plant(folder / name, marker)
    write_digests(folder)  # whoever can write the folder can rewrite its digests: they no longer stop this
    verify_digests(folder)
    proc = pretrain_one_process(write_config(base_config(paths, run, **RUN), tmp_path / "tampered.yaml"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{folder / name}: needs the global getattr" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not marker.exists()
    assert not (run / "metrics.jsonl").exists()  # nothing trained, nothing recorded


@pytest.mark.slow
def test_the_export_consolidation_refuses_a_planted_pickle(reference, tmp_path):
    from kdlib.training.checkpoints import consolidated_fp32_state_dict

    _, ref = reference
    marker, run = tmp_path / "payload-ran", tmp_path / "export"
    folder = copy_step(ref, run, 4)
    full = consolidated_fp32_state_dict(folder)  # the untouched folder consolidates, weights only
    assert full and all(v.dtype == torch.float32 for v in full.values())
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(folder / name, marker)
    write_digests(folder)
    with pytest.raises(KDError, match=rf"{name}: {PLANTED}"):
        consolidated_fp32_state_dict(folder)
    assert not marker.exists() and torch.load is torch.serialization.load
