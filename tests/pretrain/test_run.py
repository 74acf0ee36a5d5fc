"""The real entry point under torchrun: 2 gloo processes, real DeepSpeed, a tiny teacher and transfer set.

Runs are shared between tests through module fixtures (each costs ~20-35 s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from kdlib.runtime.metrics import read_metrics
from tests.transfer_fixture import (REPO, base_config, build_transfer_set, export_weights, free_port,
                                    probe_export_in_clean_process, run_pretrain, stage_env, start_pretrain,
                                    wait_for_step, write_config)

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

# First-step loss of the fixture run (kd_topk + 0.5 * mlm_ce, 2 ranks x 2 micro-batches of 8), pinned.
PINNED_FIRST_LOSS = 7.8618409633636475


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("pretrain_fixture"))


@pytest.fixture(scope="module")
def runs(fixture_paths, tmp_path_factory):
    """Lazily run named configurations once per module: runs(name, **overrides) -> output folder."""
    root = tmp_path_factory.mktemp("runs")
    done = {}

    def run(name: str, **overrides):
        if name not in done:
            out = root / name
            config = write_config(base_config(fixture_paths, out, **overrides), root / f"{name}.yaml")
            proc = run_pretrain(config)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            done[name] = (out, proc.stdout + proc.stderr)
        return done[name]

    return run


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_loss_falls_and_agreement_rises(runs):
    out, log = runs("long", steps=30, checkpoint_every=100)
    train = read_metrics(out / "metrics.jsonl")
    evals = read_metrics(out / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    assert train[-1]["kd_topk"] < 0.7 * train[0]["kd_topk"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[0]["top1_agreement"] < 0.05 and evals[-1]["top1_agreement"] > 0.15, evals
    assert abs(train[0]["loss"] - PINNED_FIRST_LOSS) < 1e-5, train[0]["loss"]
    assert abs(train[0]["loss"] - train[0]["kd_topk"] - train[0]["mlm_ce"]) < 1e-6  # parts sum to the total
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out top-1 agreement with the teacher" in log and "tokens/s" in log


def test_zero_stages_give_the_same_first_step_loss(runs):
    first = {stage: losses(runs(f"zero{stage}", **{"engine.zero_stage": stage}, steps=2 if stage == 0 else 6)[0])[1]
             for stage in (0, 2, 3)}
    assert abs(first[0] - first[2]) < 1e-6 and abs(first[0] - first[3]) < 1e-6, first
    assert abs(first[2] - PINNED_FIRST_LOSS) < 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_export_loads_without_project_code_and_matches_the_trainer(runs, stage):
    out, _ = runs(f"zero{stage}", **{"engine.zero_stage": stage}, steps=6)
    folder = out / "export"
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert not any(k.startswith("projections") for k in export_weights(folder))
    card = (folder / "README.md").read_text()
    assert "kd_topk" in card and "mlm_ce" in card and "| optimizer steps | 6 |" in card
    assert probe_export_in_clean_process(out) <= 1e-6


@pytest.mark.parametrize("stage", [2, 3])
def test_kill_9_and_resume_is_bit_identical(runs, fixture_paths, tmp_path, stage):
    reference, _ = runs(f"zero{stage}", **{"engine.zero_stage": stage}, steps=6)
    out = tmp_path / "killed"
    config = write_config(base_config(fixture_paths, out, **{"engine.zero_stage": stage}, steps=6), tmp_path / "k.yaml")
    proc = start_pretrain(config, log=tmp_path / "killed.log")
    try:
        wait_for_step(out / "metrics.jsonl", 4, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: torchrun and both ranks, no chance to clean up
        proc.wait()
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step-3", "step-6")
    assert not (out / "export").exists()
    resumed = run_pretrain(config)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(reference)  # exact equality, every step (the resumed run's records win)
    mine, theirs = export_weights(out / "export"), export_weights(reference / "export")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_sigterm_checkpoints_at_the_next_step_boundary_and_exits_75(fixture_paths, tmp_path):
    """Launched like plain srun: two processes with SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID only."""
    out = tmp_path / "term"
    config = write_config(base_config(fixture_paths, out, steps=200, checkpoint_every=1000), tmp_path / "t.yaml")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = stage_env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(config)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        wait_for_step(out / "metrics.jsonl", 2, procs[0])
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], outputs
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert 2 <= last < 200
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{last}"
    assert "can be requeued" in outputs[0]
