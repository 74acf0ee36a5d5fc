"""finetune on several ranks: only its training steps (teacher, distill) take part in a multi-rank job; any other
step refuses, in one line, to run as one rank of many (launch local / launch slurm run those once)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.finetune_fixture import base_config, write_config
from tests.paths import REPO_ROOT


def test_a_step_that_runs_once_refuses_to_be_one_rank_of_two(tmp_path):
    config = write_config(base_config(tmp_path), tmp_path / "finetune.yaml")
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for step in ("folds", "report"):  # one before and one after the training steps
        proc = subprocess.run([sys.executable, "-m", "finetune", step, "--config", str(config)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines() == [f"error: {step}: runs once, not on 2 ranks; only the steps teacher, "
                                            "distill train on several ranks (`python -m launch local|slurm --stage "
                                            "finetune` runs each step where it belongs)"]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    check = subprocess.run([sys.executable, "-m", "finetune", "folds", "--config", str(config), "--check"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]  # what launch slurm runs before it submits
