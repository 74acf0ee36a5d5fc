"""launch/plans.py: which steps of each stage run on every rank and which once, and the commands both launchers
build from it (the sbatch script's lines are checked by bash's parser)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from kdlib.errors import KDError
from launch.plans import PLANS, Step, command, plan
from launch.script_values import shell_line
from launch.slurm import SlurmJob, render, steps_block
from tests.transfer_fixture import REPO


def test_finetune_trains_on_every_rank_only_in_its_training_steps():
    assert [(s.name, s.on_ranks) for s in plan("finetune")] == [
        ("folds", False), ("teacher", True), ("transfer", False), ("distill", True), ("speed", False),
        ("deploy", False), ("report", False)]
    assert plan("pretrain") == (Step(None, True),)
    assert all(not s.on_ranks for stage in ("teacher", "teacher.decoder") for s in plan(stage))
    assert plan("finetune", "distill") == (Step("distill", True),)


def test_an_unknown_step_is_refused_naming_the_known_ones():
    with pytest.raises(KDError, match="finetune has the steps folds, teacher, transfer, distill, speed, deploy, "
                                      "report, not 'distil'"):
        plan("finetune", "distil")
    with pytest.raises(KDError, match="pretrain has no steps"):
        plan("pretrain", "distill")


def test_commands_and_log_names():
    step = Step("distill", True)
    assert command("py", "finetune", step, "/c.yaml", ["steps=3"], ["--arm", "kd"]) == [
        "py", "-m", "finetune", "distill", "--config", "/c.yaml", "--set", "steps=3", "--arm", "kd"]
    assert command("py", "pretrain", Step(None, True), "/c.yaml", [], []) == ["py", "-m", "pretrain", "--config",
                                                                                "/c.yaml"]
    assert [s.log_name("finetune") for s in (Step(None, True), step, Step("folds", False))] == [
        "rank-%t.out", "distill-rank-%t.out", "folds.out"]
    assert Step(None, False).log_name("teacher") == "teacher.out"
    assert shell_line(["a b", "c\nd", "e"]) == "'a b' 'c\nd' e"


def test_the_sbatch_script_runs_training_steps_with_srun_and_the_others_once_as_a_1_process_job(tmp_path):
    spaced = "name=it's a \"value\" with $HOME"  # spaces, quotes and a $: one word for the stage, as typed
    job = SlurmJob(config=str(tmp_path / "f t.yaml"), nodes=2, gpus_per_node=0, tasks_per_node=1,
                   output_dir=str(tmp_path / "out dir"), stage="finetune", stage_args=["--fold", "0"], sets=[spaced])
    lines = steps_block(job).splitlines()
    sruns = [line for line in lines if "srun " in line]
    once = [line for line in lines if "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 " in line]
    assert [line.split(" -m finetune ")[1].split()[0] for line in sruns] == ["teacher", "distill"]
    assert [line.split(" -m finetune ")[1].split()[0] for line in once] == ["folds", "transfer", "speed", "deploy",
                                                                              "report"]
    assert lines[1] == "code=$?" and lines[2] == 'if [ "$code" -eq 0 ]; then'  # each later step only after success
    first = shlex.split(once[0].split("LOCAL_RANK=0 ")[1].split(" >")[0])
    assert first[first.index("--set") + 1] == spaced and first[first.index("--config") + 1] == job.config
    script = render(job)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert f"ranks={shlex.quote(str(tmp_path / 'out dir' / 'slurm'))}/job-$SLURM_JOB_ID/" in script


@pytest.mark.parametrize("flag,value,expected", [
    ("--partition", "gpu\nsrun rm -rf ~", "--partition: expected letters"),
    ("--job-name", "a b", "--job-name: expected letters"),
    ("--set", "steps=3\ntouch /tmp/owned", "--set: 'steps=3\\ntouch /tmp/owned' holds a control character"),
    ("--tasks-per-node", "-2", "--tasks-per-node: expected 0 or more, got -2"),
    ("--cpus-per-task", "0", "--cpus-per-task: expected 1 or more, got 0"),
])
def test_a_hostile_or_out_of_range_value_never_reaches_the_script(tmp_path, flag, value, expected):
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    proc = subprocess.run([sys.executable, "-m", "launch", "slurm", "--config", str(config), "--dry-run", flag, value],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()


def test_launch_local_refuses_an_unknown_step_and_a_bad_port_in_one_line(tmp_path):
    def launch(*args):
        return subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--config",
                               str(tmp_path / "none.yaml"), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    for args, expected in ((["--stage", "finetune", "--step", "distil"], "--step: finetune has the steps"),
                           (["--master-port", "70000"], "--master-port: expected a TCP port")):
        proc = launch(*args)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr


def test_every_stage_a_launcher_runs_has_a_plan():
    assert set(PLANS) == {"pretrain", "finetune", "teacher", "teacher.decoder", "data_pipeline"}
    assert plan("data_pipeline") == (Step(None, False, dask=True),)


@pytest.mark.parametrize("stage,config", [("teacher", "configs/demo_teacher.yaml"),
                                          ("teacher.decoder", "configs/decoder/teacher.yaml")])
def test_a_teacher_preparation_is_a_one_process_job(stage, config, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch", "slurm", "--stage", stage, "--config", config, "--nodes",
                           "1", "--set", f"output_dir={tmp_path / 'out'}", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the stage's --check accepted the config
    lines = [line for line in proc.stdout.splitlines() if f" -m {stage} " in line]
    assert len(lines) == 1 and lines[0].startswith("RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 ") and "srun" not in lines[0]
    assert lines[0].endswith(f' >"$ranks/{stage}.out" 2>&1')
    assert not (tmp_path / "out").exists()
