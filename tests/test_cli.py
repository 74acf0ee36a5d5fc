"""Every entry point introduces itself as what the user typed (`usage: python -m finetune distill ...`, not
`usage: __main__.py ...`), with the common flags spelled, explained and ordered the same way; a missing config
file is one line naming it and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune.__main__ import STEP_HELP
from finetune.layout import STEPS
from kdlib.runtime.cli import CONFIG_HELP, SET_HELP, stage_parser, summary
from tests.paths import REPO_ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# (command after `python -m`, takes --config (None: not checked), parser built by kdlib.runtime.cli.stage_parser)
ENTRY_POINTS = [
    ("data_pipeline", True, True),
    ("data_pipeline ls", False, True),
    ("data_pipeline gc", False, True),
    ("teacher", True, True),
    ("teacher.decoder", True, True),
    ("pretrain", True, True),
    ("finetune", True, True),
    *[(f"finetune {step}", True, True) for step in STEPS],
    ("evaluate", True, True),
    ("deploy", True, True),
    ("report", True, True),
    ("report.steps", False, True),
    ("launch", False, True),
    ("launch local", True, False),  # launch/local.py and launch/slurm.py build their own parsers (same flags)
    ("launch slurm", True, False),
    ("launch testcluster", False, True),
    ("bench", False, True),
    ("bench.gpu", False, True),
    ("report.numbers", False, True),
    ("kdlib.teachers.inspect", False, True),
    # each benchmark: its own argparse parser, named as typed
    *[(f"bench.{path.stem}", None, False) for path in sorted((REPO_ROOT / "bench").glob("*.py"))
      if "argparse.ArgumentParser(" in path.read_text()],
]


def run_module(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command.split(), *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command,takes_config,shared", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_help_names_the_command_typed_and_spells_the_common_flags_alike(command, takes_config, shared):
    proc = run_module(command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"usage: python -m {command} [-h]"), lines[0]
    usage = " ".join(proc.stdout.split("\n\n")[0].split())  # the usage block, however argparse wrapped it
    flat = " ".join(proc.stdout.split())
    if takes_config is not None:
        assert ("--config CONFIG" in usage) == takes_config, usage
    if takes_config:
        assert "[--set KEY=VALUE]" in usage, usage
        assert usage.index("--config CONFIG") < usage.index("[--set KEY=VALUE]"), usage
    if shared:  # the layout of stage_parser: usage, one-line description, options (-h, --config, --set first)
        description = proc.stdout.split("\n\n")[1]
        assert "\n" not in description and not description.startswith(("`", "usage")), description
        assert "__main__" not in proc.stdout and ".py" not in lines[0]
        options = flat[flat.index("options: -h, --help show this help message and exit"):]
        if takes_config:
            assert options.index(f"--config CONFIG {CONFIG_HELP}") < options.index(f"--set KEY=VALUE {SET_HELP}")
            assert options.index(f"--set KEY=VALUE {SET_HELP}") < min(
                [options.index(flag) for flag in ("--check", "--fold", "--export-init") if flag in options] or [10**9])


@pytest.mark.parametrize("command", ["deploy", "finetune distill"])
def test_a_missing_config_file_is_one_line_naming_it_and_status_2(command, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    proc = run_module(command, "--config", str(missing))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {missing}: config file not found"], proc.stderr[-2000:]
    assert proc.stdout == ""


def test_launch_without_a_command_says_its_usage_and_exits_2():
    proc = run_module("launch")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == "usage: python -m launch [-h] {local,slurm,testcluster} [ARG ...]"
    assert proc.stderr.splitlines()[-1] == "python -m launch: error: the following arguments are required: command"


def test_finetune_names_a_help_line_for_each_step_of_its_layout():
    assert tuple(STEP_HELP) == STEPS + ("all",)


def test_a_step_is_read_before_or_after_the_flags_and_repeats_accumulate_across_it(capsys):
    parser = stage_parser("stage", "`python -m stage`: what it does.", default_step="all",
                          steps={"one": "the first", "two": "the second", "all": "both"},
                          flags=lambda p: p.add_argument("--fold", type=int, action="append"))
    args = parser.parse_args(["--config", "c.yaml", "--fold", "0", "two", "--fold", "1", "--set", "a=1"])
    assert (args.step, args.config, args.fold, args.set) == ("two", "c.yaml", [0, 1], ["a=1"])
    args = parser.parse_args(["one", "--config", "c.yaml"])
    assert (args.step, args.config, args.fold, args.set) == ("one", "c.yaml", None, [])
    assert parser.parse_args(["--config", "c.yaml"]).step == "all"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["two", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert " ".join(out.split("\n\n")[0].split()) == \
        "usage: python -m stage two [-h] --config CONFIG [--set KEY=VALUE] [--fold FOLD]"
    assert out.split("\n\n")[1] == "the second"


def test_the_description_is_the_docstrings_first_paragraph_without_the_usage_it_repeats():
    assert summary("`python -m x --config X.yaml`: train a\nhead.\n\nMore.") == "train a head."
    assert summary("Plain first line.\nsecond line\n\nMore.") == "Plain first line. second line"
