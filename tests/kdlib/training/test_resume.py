"""Resume through the real entry point (torchrun, 2 gloo processes, real DeepSpeed): BERT-EMD layer
weights travel in the checkpoint and a resumed run continues bit for bit; a resume that would change
what the objectives compute (a new `steps` while a weight schedule reads it) is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from kdlib.runtime.metrics import read_metrics
from tests.transfer_fixture import (REPO, base_config, build_transfer_set, export_weights, run_pretrain, stage_env,
                                    write_config)

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

EMD_RUN = {"online_teacher": True, "layer_map": {"name": "emd", "emd_temperature": 0.5},
           "objectives": [{"name": "kd_topk", "weight_schedule": {"name": "linear", "start": 1.0, "end": 0.5}},
                          {"name": "bert_emd", "weight": 1.0}],
           "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "engine.optim.decay_steps": 10,
           "eval_rows": 32}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("emd")
    paths = build_transfer_set(root / "fixture", rows=160, teacher_steps=20)
    out = root / "reference"
    config = write_config(base_config(paths, out, **EMD_RUN), root / "reference.yaml")
    proc = run_pretrain(config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return paths, out, config


def trainer_state(out, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


def test_emd_layer_weights_are_learned_and_survive_a_resume_bit_exactly(reference, tmp_path):
    paths, ref, _ = reference
    at2, at4 = trainer_state(ref, 2)["loss_state"]["emd"], trainer_state(ref, 4)["loss_state"]["emd"]
    assert at2 != at4 and at2["teacher_weights"] != [0.25] * 4  # the weights move away from uniform, step by step
    assert abs(sum(at4["teacher_weights"]) - 1) < 1e-12 and abs(sum(at4["student_weights"]) - 1) < 1e-12

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    (resumed / "checkpoints" / "latest").write_text("step-2\n")
    config = write_config(base_config(paths, resumed, **EMD_RUN), tmp_path / "resumed.yaml")
    proc = run_pretrain(config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert trainer_state(resumed, 4)["loss_state"] == trainer_state(ref, 4)["loss_state"]  # exact floats
    mine = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    theirs = {r["step"]: r for r in read_metrics(ref / "metrics.jsonl")}
    assert sorted(mine) == [3, 4]
    assert all(mine[s]["bert_emd"] == theirs[s]["bert_emd"] and mine[s]["loss"] == theirs[s]["loss"] for s in mine)
    a, b = export_weights(resumed / "export"), export_weights(ref / "export")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_longer_run_is_refused_when_a_schedule_reads_the_steps(reference, tmp_path):
    paths, ref, _ = reference
    record = (ref / "resolved_config.yaml").read_text()
    longer = write_config(base_config(paths, ref, **{**EMD_RUN, "steps": 6}), tmp_path / "longer.yaml")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--config", str(longer)], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=300)  # one process, as a user would; exit code as is
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = trainer_state(ref, 4)["config_hash"]
    assert saved in proc.stderr and "steps changed from 4 to 6, and kd_topk read the run's total steps" in proc.stderr
    assert (ref / "resolved_config.yaml").read_text() == record  # the record of what was trained is untouched


class _Payload:
    """A planted pickle: unpickling it touches a marker file (standing in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (self.marker,))


def run_one_process(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=300)


def test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled(reference, tmp_path):
    import pickle

    paths, ref, _ = reference
    marker = tmp_path / "payload-ran"
    for name, how in (("mp_rank_00_model_states.pt", "changed since the checkpoint was written"),
                      ("zero_pp_rank_7_mp_rank_00_optim_states.pt", "was not written with this checkpoint")):
        run = tmp_path / f"tampered-{name[:8]}"
        shutil.copytree(ref / "checkpoints" / "step-2", run / "checkpoints" / "step-2")
        (run / "checkpoints" / "latest").write_text("step-2\n")
        (run / "checkpoints" / "step-2" / name).write_bytes(pickle.dumps(_Payload(marker)))
        proc = run_one_process(write_config(base_config(paths, run, **EMD_RUN), tmp_path / f"{name}.yaml"))
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"{name}" in proc.stderr and how in proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists()
        assert not (run / "metrics.jsonl").exists()  # nothing trained, nothing recorded


def test_pretrain_refuses_an_output_dir_that_is_not_a_run_and_changes_nothing(reference, tmp_path):
    from kdlib.runtime.io import sha256_file

    paths, _, _ = reference
    transfer = paths["transfer"]
    before = {str(p): sha256_file(p) for p in transfer.rglob("*") if p.is_file()}
    proc = run_one_process(write_config(base_config(paths, transfer, **EMD_RUN), tmp_path / "into-transfer.yaml"))
    assert proc.returncode == 2 and "did not write (manifest.json, shards/)" in proc.stderr, proc.stderr[-3000:]
    assert {str(p): sha256_file(p) for p in transfer.rglob("*") if p.is_file()} == before


def test_resume_false_over_a_run_with_checkpoints_is_refused_and_changes_nothing(reference, tmp_path):
    from kdlib.runtime.io import sha256_file

    paths, ref, _ = reference
    before = {str(p): sha256_file(p) for p in ref.rglob("*") if p.is_file()}
    proc = run_one_process(write_config(base_config(paths, ref, **{**EMD_RUN, "resume": False}),
                                        tmp_path / "afresh.yaml"))
    assert proc.returncode == 2 and "holds a run with checkpoints up to step 4; resume: false" in proc.stderr, \
        proc.stderr[-3000:]
    assert {str(p): sha256_file(p) for p in ref.rglob("*") if p.is_file()} == before
