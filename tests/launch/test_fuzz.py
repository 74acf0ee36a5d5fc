"""Bad input to `python -m launch local` and `python -m launch slurm --dry-run` (issue 33): each flag, and what the
launchers read of the stage config, wrong in each way tests/fuzz.py knows, ends in exit 2 with one `error:` line
naming it, before a rank starts or a script is printed, and no file changes. Hostile but legal values (spaces,
quotes, `$( )`, backquotes, `;`, `%` in paths, --set values and stage arguments) are accepted, and the rendered
script, checked by bash's parser and then run by bash with recording stand-ins for srun, scontrol and python, hands
each to the stage as one word and runs none of them.

The stage's own `--check` (which `launch slurm` runs before rendering) is stubbed in process: it is the stage's
subject (tests/<stage>/test_fuzz.py), and one subprocess test below runs the real one with hostile paths."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import local, slurm
from launch.__main__ import main
from launch.script_values import quote
from tests.fuzz import NEWLINE, Case, assert_refused, config_cases, flag_cases, run_main
from tests.launch.test_dask_block import run_script, stubs
from tests.transfer_fixture import REPO

VALID = {**yaml.safe_load((REPO / "configs" / "pretrain_demo.yaml").read_text()), "output_dir": "{root}/run",
         "teacher": {"path": "{root}/teacher", "task": "masked_lm"}, "transfer_set": "{root}/transfer"}
SINFO = "#!/bin/sh\nprintf 'debug*\\ncpu\\ngpu\\n'\n"  # what `sinfo -h -o %R` prints on the stand-in cluster
BASH = shutil.which("bash")


def flag(label: str, *argv: str, names: tuple[str, ...] = ()) -> Case:
    return Case(label, names or (label.split("/")[0],), argv=argv)


def field(label: str, value, *argv: str) -> Case:
    return Case(label, ("'output_dir'", "output_dir:"), config=(("output_dir", value),), argv=argv)


def file_at(name: str, under: str = ""):
    """A maker (tests/fuzz.py calls it with the workspace): a regular file `name`, and the path `under` it."""
    def make(workspace: Path) -> str:
        (workspace / name).write_text("the user's own file\n")
        return str(workspace / name / under) if under else str(workspace / name)
    return make


def beside_a_file(workspace: Path) -> str:
    """An output_dir whose data_pipeline log folder (`<output_dir>.slurm`, beside it) is a file."""
    file_at("set.slurm")(workspace)
    return str(workspace / "set")


COMMON = [  # what both launchers read or pass on
    flag("--config/missing", "--config", "{root}/no-such.yaml", names=("no-such.yaml: config file not found",)),
    flag("--config/a folder", "--config", "{root}", names=("is a folder",)),
    flag("--config/newline", "--config", "{root}/a\nb.yaml"),
    flag("--set/newline", "--set", "steps=3\ntouch /tmp/owned"),
    flag("--set/no equals sign", "--set", "steps"),
    flag("--set/into a value", "--set", "steps.x=1", names=("field 'steps' is not a section",)),
    flag("--set/not YAML", "--set", "steps=*"),
    flag("--set/a backquote first", "--set", "note=`touch PWNED`"),
    flag("--/newline", "--", "--fold", NEWLINE, names=("-- (a stage argument)",)),
    flag("--step/not pretrain's", "--step", "distill"),
    flag("--step/not finetune's", "--stage", "finetune", "--step", "distil"),
    flag("--stage/data_pipeline with --runner", "--stage", "data_pipeline", "--", "--runner", "DirectRunner",
         names=("-- --runner",)),
    flag("--stage/data_pipeline with --scheduler-file", "--stage", "data_pipeline", "--", "--scheduler-file=x",
         names=("-- --scheduler-file=x",)),
] + config_cases()
LOCAL_CASES = flag_cases(local.parser()) + COMMON + [
    flag("--nproc/0", "--nproc", "0"),
    flag("--nproc/-1", "--nproc", "-1"),
    flag("--master-port/0", "--master-port", "0"),
    flag("--master-port/-1", "--master-port", "-1"),
    flag("--master-port/65536", "--master-port", "65536"),
    flag("--master-port/70000", "--master-port", "70000"),
]
SLURM_CASES = flag_cases(slurm.parser()) + COMMON + [
    flag(f"{name}/{value}", name, value) for name, values in {
        "--nodes": ["0", "-1"], "--gpus-per-node": ["-1"], "--tasks-per-node": ["-1"], "--cpus-per-task": ["0"],
        "--warn-seconds": ["-1", "65536"],
        "--time": ["four hours", "1:2:3:4", "10:75", "1-24", "1-2:60", "", "-5", "04:00:00\n"],
        "--partition": ["a b", "a;b", "a,,b", "$(id)", "", "gpu\n", "nosuch", "cpu,nosuch"],
        "--job-name": ["my job", "$(id)", "`id`", "a;b", "", "kd\n"]}.items() for value in values
] + [  # of output_dir, only what would break the job's log folder: what it holds is the stage's --check's to judge
    flag("--tasks-per-node/2 Dask workers a node", "--stage", "data_pipeline", "--tasks-per-node", "2"),
    field("output_dir/type", ["a", "list"]),
    field("output_dir/null", None),
    field("output_dir/empty", ""),
    field("output_dir/newline", "{root}/a\nb"),
    field("output_dir/a backslash", "{root}/back\\slash"),
    field("output_dir/a file", file_at("a-file")),
    field("output_dir/under a file", file_at("a-file", "run")),
    field("output_dir/its log folder a file", beside_a_file, "--stage", "data_pipeline"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("launch-fuzz")


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """No rank and no stage check runs (each recorded instead), and `sinfo` is a stand-in cluster's."""
    started, checked = [], []
    monkeypatch.setattr(local, "run_ranks", lambda argv, nproc, port: started.append((argv, nproc)) or 0)
    monkeypatch.setattr(slurm, "check_config", checked.append)
    bin_dir = tmp_path / "sinfo-bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(SINFO)
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return started, checked


@pytest.mark.parametrize("case", LOCAL_CASES, ids=str)
def test_launch_local_refuses_each_bad_flag_in_one_line_before_a_rank_starts(workspace, stand_ins, case):
    assert_refused(main, case, VALID, workspace, argv_before=("local", "--nproc", "2"))
    assert stand_ins[0] == []


@pytest.mark.parametrize("case", SLURM_CASES, ids=str)
def test_launch_slurm_refuses_each_bad_flag_in_one_line_before_a_script(workspace, stand_ins, case):
    assert_refused(main, case, VALID, workspace, argv_before=("slurm", "--dry-run"))
    assert stand_ins[1] == []


# ---------------------------------------------------------------- hostile but legal values are accepted, as typed

HOSTILE = {"a space": "out dir", "quotes": "it's \"quoted\"", "command substitution": "$(touch PWNED1)",
           "backquotes": "`touch PWNED2`", "a semicolon": "x; touch PWNED3", "a pipe": "x | touch PWNED4 & y",
           "a percent": "100%j %%", "a variable": "$HOME ${PATH}", "a hash": "x #not a comment",
           "a glob": "* ?", "not ASCII": "café ünï"}
STAGE_CONFIGS = {"finetune": "finetune_demo.yaml", "data_pipeline": "demo_pipeline.yaml"}
SRUN = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ["STUB_RECORD"], "srun.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""  # a training step's srun: recorded, never run (tests/launch/test_dask_block.py's stands in for Dask's)


def hostile_job(tmp_path: Path, stage: str, value: str) -> tuple[Path, Path, list[str]]:
    """A stage config in a folder named with `value`, its output_dir named with it, and the words a launcher gets
    after --config: a --set and a stage argument holding it."""
    config = tmp_path / f"config {value}" / "c.yaml"
    config.parent.mkdir()
    out = tmp_path / f"out {value}"
    data = yaml.safe_load((REPO / "configs" / STAGE_CONFIGS[stage]).read_text())
    config.write_text(json.dumps({**data, "output_dir": str(out)}))
    return config, out, ["--set", f"note=x {value}", "--", "--note", value]


def sbatch_argument(text: str) -> str:
    """The first argument of an `#SBATCH` line's rest as sbatch reads it (slurm's src/sbatch/opt.c _get_argument):
    ' or " quote, a backslash escapes the next character, an unquoted # or space ends it."""
    out, quoting, escaped = [], None, False
    for ch in text.lstrip():
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
            continue
        elif quoting:
            if ch == quoting:
                quoting = None
                continue
        elif ch in "\"'":
            quoting = ch
            continue
        elif ch == "#" or ch.isspace():
            break
        out.append(ch)
    assert quoting is None, text
    return "".join(out)


@pytest.mark.parametrize("stage", STAGE_CONFIGS)
@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_but_legal_value_reaches_the_stage_as_one_word_and_runs_nothing(tmp_path, stand_ins, monkeypatch,
                                                                                   stage, value):
    config, out, words = hostile_job(tmp_path, stage, value)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the script's `cd`: where a payload that ran would leave its file
    code, script = run_main(main, ["slurm", "--dry-run", "--stage", stage, "--config", str(config), *words])
    assert code == 0, script
    assert subprocess.run([BASH, "-n"], input=script, text=True, capture_output=True).returncode == 0
    log = Path(f"{out}.slurm") if stage == "data_pipeline" else out / "slurm"
    typed = ["--config", str(config.resolve()), "--set", words[1], "--note", value]
    # as text: sbatch reads the log pattern back as the folder (%% is sbatch's %), the shell each value as one word
    output = [sbatch_argument(line[len("#SBATCH"):]) for line in script.splitlines()
              if line.startswith("#SBATCH --output=")]
    assert [re.sub("%%", "%", o) for o in output] == [f"--output={log}/job-%j.out"]
    commands = [shlex.split(line.removesuffix(" \\")) for line in script.splitlines() if f" -m {stage} " in line]
    assert commands and all(any(argv[i:i + len(typed)] == typed for i in range(len(argv))) for argv in commands)
    # run: bash with recording stand-ins for srun, scontrol and python, as a restart (which reads output_dir again)
    stubs(tmp_path)
    if stage != "data_pipeline":
        (tmp_path / "bin" / "srun").write_text(SRUN)
    out.mkdir()
    proc, sruns, pythons = run_script(tmp_path, script.replace(quote(sys.executable), str(tmp_path / "bin" / "python")),
                                      SLURM_RESTART_COUNT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = [argv for argv in sruns + pythons if stage in argv]
    assert len(ran) == (1 if stage == "data_pipeline" else 7), (sruns, pythons)
    assert all(argv[argv.index("--config"):argv.index("--config") + len(typed)] == typed for argv in ran)
    assert (log / "job-7" / "restart-1").is_dir() and not list(tmp_path.rglob("PWNED*"))


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_launch_local_passes_a_hostile_value_to_every_rank_as_one_word(tmp_path, stand_ins, value):
    config, _, words = hostile_job(tmp_path, "finetune", value)
    code, printed = run_main(main, ["local", "--nproc", "2", "--stage", "finetune", "--config", str(config), *words])
    assert code == 0, printed
    typed = ["--config", str(config), "--set", words[1], "--note", value]
    assert [(argv[3], nproc) for argv, nproc in stand_ins[0]] == [
        ("folds", 1), ("teacher", 2), ("transfer", 1), ("distill", 2), ("speed", 1), ("deploy", 1), ("report", 1)]
    assert all(argv[4:] == typed for argv, _ in stand_ins[0])


def test_the_real_stage_check_and_script_take_hostile_paths(tmp_path):
    """No stand-ins: `python -m launch slurm` runs `python -m data_pipeline --check` on a config whose path and
    output_dir hold every hostile character at once."""
    value = "".join(HOSTILE.values())
    config, out, _ = hostile_job(tmp_path, "data_pipeline", value)
    proc = subprocess.run([sys.executable, "-m", "launch", "slurm", "--stage", "data_pipeline", "--config",
                           str(config), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert subprocess.run([BASH, "-n"], input=proc.stdout, text=True).returncode == 0
    assert f"ranks={quote(f'{out}.slurm')}/job-$SLURM_JOB_ID/" in proc.stdout
    assert not list(tmp_path.rglob("PWNED*")) and not out.exists() and not Path(f"{out}.slurm").exists()
