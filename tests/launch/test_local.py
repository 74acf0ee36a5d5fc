"""`python -m launch local`: the torchrun environment contract on one machine, with exit statuses a user and a
scheduler can act on (0 done, 2 user error in one line, 75 preempted and resumable)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from kdlib.training.checkpoints import checkpoint_steps
from kdlib.runtime.metrics import read_metrics
from launch.local import exit_status
from tests.transfer_fixture import (REPO, base_config, build_transfer_set, stage_env, torchrun_command, wait_for_step,
                                    write_config)


def launch_command(config, nproc: int = 2, *extra) -> list[str]:
    return [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--config", str(config), *extra]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("launch_fixture"))


@pytest.mark.slow
def test_two_ranks_train_exactly_as_under_torchrun(paths, tmp_path):
    runs = {}
    for name in ("launch", "torchrun"):
        out = tmp_path / name
        config = write_config(base_config(paths, out, steps=3), tmp_path / f"{name}.yaml")
        command = launch_command(config) if name == "launch" else torchrun_command(config)
        proc = subprocess.run(command, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in runs["launch"]] == [1, 2, 3]
    assert [(r["loss"], r["kd_topk"]) for r in runs["launch"]] == [(r["loss"], r["kd_topk"]) for r in runs["torchrun"]]


@pytest.mark.slow
def test_a_config_error_is_one_line_and_exit_2(paths, tmp_path):
    config = write_config(base_config(paths, tmp_path / "never", steps=0), tmp_path / "bad.yaml")
    proc = subprocess.run(launch_command(config), cwd=REPO, env=stage_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "field 'steps'" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_exits_75_and_the_rerun_finishes(paths, tmp_path):
    out = tmp_path / "preempted"
    config = write_config(base_config(paths, out, steps=12, checkpoint_every=100), tmp_path / "long.yaml")
    proc = subprocess.Popen(launch_command(config), cwd=REPO, env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    saved = checkpoint_steps(out / "checkpoints")
    assert saved and 2 <= saved[-1] < 12
    again = subprocess.run(launch_command(config), cwd=REPO, env=stage_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 12


def test_one_status_for_the_job():
    assert exit_status([0, 0]) == 0
    assert exit_status([75, 75]) == 75
    assert exit_status([2, 2]) == 2
    assert exit_status([0, -9]) == -9  # a rank killed: the job failed
    assert exit_status([1, -15]) == 1  # rank 0's own failure first
    assert exit_status([75, 0]) == 75  # a checkpoint was written; a rerun resumes
    assert exit_status([0, 2]) == 2
