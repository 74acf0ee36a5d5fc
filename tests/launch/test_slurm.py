"""`python -m launch slurm`: the sbatch script it renders (checked as text and by bash's parser), and a config
error that stops before sbatch is ever called. Jobs on a real multi-host cluster: tests/launch/test_multinode.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.transfer_fixture import REPO, base_config, build_transfer_set, stage_env, write_config

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("slurm_fixture"), rows=160, teacher_steps=5)


def launch_slurm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", "slurm", *args], cwd=REPO, env=stage_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_script_for_4_nodes_x_8_gpus_has_the_rendezvous_tasks_signal_and_requeue(paths, tmp_path):
    out = tmp_path / "run"
    config = write_config(base_config(paths, out, **{"engine.micro_batch": 1, "engine.grad_accum": 1,
                                                      "eval_rows": 32}), tmp_path / "big.yaml")
    proc = launch_slurm("--config", str(config), "--nodes", "4", "--gpus-per-node", "8", "--time", "04:00:00",
                        "--partition", "gpu", "--set", "steps=100", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu", "#SBATCH --signal=USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", f'#SBATCH --output="{out}/slurm/job-%j.out"',
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 1000))", '  scontrol requeue "$SLURM_JOB_ID"'):
        assert line in lines, (line, script)
    srun = [line for line in lines if line.startswith("srun ")]
    assert srun == [f'srun --output="$ranks/rank-%t.out" {sys.executable} -m pretrain --config {config.resolve()} '
                    "--set steps=100"]
    assert "DS_ACCELERATOR" not in script  # GPU nodes
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not out.exists()  # a dry run writes nothing


def test_cpu_nodes_get_tasks_per_node_and_the_cpu_accelerator(paths, tmp_path):
    config = write_config(base_config(paths, tmp_path / "cpu"), tmp_path / "cpu.yaml")
    proc = launch_slurm("--config", str(config), "--nodes", "1", "--tasks-per-node", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "#SBATCH --ntasks-per-node=2" in proc.stdout and "export DS_ACCELERATOR=cpu" in proc.stdout
    assert "--gpus-per-node" not in proc.stdout.replace("# (CPU nodes: no GPUs)", "")


def test_a_config_error_fails_before_sbatch_in_one_line(paths, tmp_path):
    out = tmp_path / "never"
    config = write_config(base_config(paths, out), tmp_path / "bad.yaml")
    # 4 x 8 ranks x 8 x 2 sequences per step: more than the fixture's training rows
    proc = launch_slurm("--config", str(config), "--nodes", "4", "--gpus-per-node", "8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "fewer than one global batch of 512" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists()  # no script, no log folder: nothing reached sbatch
    proc = launch_slurm("--config", str(config), "--time", "four hours", "--dry-run")
    assert proc.returncode == 2 and "--time: expected a SLURM time" in proc.stderr
