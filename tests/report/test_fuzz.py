"""Bad input to `python -m report` (issue 33): every field, wrong in each way tests/fuzz.py knows, each stage config
and each file read through them (missing, a folder, not UTF-8: named with its line), ends in exit 2 with one
`error:` line naming it, before anything is written; `python -m report.steps` alike; paths with a space are kept
whole. The workspace holds a small finished demo, so the valid config really builds a report."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

from kdlib.runtime.cli import stage_parser
from report.__main__ import __doc__ as REPORT_DOC, main
from report.config import ReportConfig
from report.steps import build_parser as steps_parser, main as steps_main
from tests.fuzz import (NOT_UTF8, Case, _maker, assert_refused, config_cases, digests, field_cases, flag_cases,
                        path_cases, run_main)

STAGES = ("teacher", "pipeline", "pretrain", "evaluate", "finetune")
VALID = {"output_dir": "{root}/report", "steps": "{root}/steps.json",
         "configs": {name: f"{{root}}/{name}.yaml" for name in STAGES},
         "teacher_model": "teacher", "student_model": "student", "untrained_model": "untrained",
         "task_metric": "accuracy",
         "targets": {"word_similarity_percent": 97.0, "pooled_cosine": 0.95, "speedup": 1.9, "task_percent": 97.0,
                     "int8_max_loss_points": 1.0},
         "notes": {"speedup": "the student shares the teacher's width"}}
EVAL_KEYS = ("simlex999_spearman", "wordsim353_spearman", "masked_top1_agreement", "masked_kl", "pooled_cosine")
# each stage's output file the report reads, relative to that stage's output_dir
OUTPUTS = {"teacher": "teacher_report.json", "pretrain": "metrics.jsonl", "evaluate": "evaluation.json",
           "finetune": "report/report.json"}


def summary(mean: float) -> dict:
    return {"mean": mean, "std": 0.01}


def finished_demo(root: Path) -> None:
    """What the demo's stages leave, as small as the report accepts: each stage's config (its output_dir) and the
    files the report reads from there."""
    for name in STAGES:
        (root / f"{name}.yaml").write_text(json.dumps({"output_dir": str(root / f"{name} out"), "steps": 10}))
        (root / f"{name} out").mkdir()
    (root / "steps.json").write_text(json.dumps({"setup": {"work_seconds": 30.0}, "teacher": {"work_seconds": 90.0}}))
    (root / "teacher out/teacher_report.json").write_text(json.dumps({"train_loss": [3.0, 2.5, 2.25]}))
    (root / "pretrain out/metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 / s})
                                                             + "\n" for s in (1, 2, 3)))
    models = {name: {"metrics": {**{k: 0.5 for k in EVAL_KEYS}, "sequences_per_s": speed, "parameters": 1_000_000},
                     "percent_of_teacher": {k: 90.0 for k in EVAL_KEYS}, "speedup_vs_teacher": speed / 10}
              for name, speed in (("teacher", 10.0), ("student", 20.0), ("untrained", 20.0))}
    (root / "evaluate out/evaluation.json").write_text(json.dumps(
        {"models": models, "settings": {"speed": {"batch_size": 32, "length": 128, "threads": 1}}}))
    (root / "evaluate out/evaluation.png").write_bytes(b"\x89PNG")
    task = root / "finetune out"
    (task / "report").mkdir()
    run = task / "fold-0/seed-0/kd"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 0.7}) + "\n")
    arms = {arm: {"metrics": {"accuracy": summary(mean)}, "percent_of_teacher": {"accuracy": 100 * mean / 0.9}, "n": 2}
            for arm, mean in (("teacher", 0.9), ("kd", 0.88), ("baseline", 0.8))}
    (task / "report/report.json").write_text(json.dumps(
        {"metrics": ["accuracy"], "arms": arms, "runs": [{"arm": "kd", "fold": 0, "seed": 0, "folder": str(run)}]}))
    (task / "report/metrics.png").write_bytes(b"\x89PNG")
    deploy = task / "fold-0/seed-0/kd-int8/export"
    deploy.mkdir(parents=True)
    candidate = {"size_bytes": 4_000_000, "throughput_seq_per_s": 50.0, "speedup": 1.0, "agreement": 1.0}
    (deploy / "deploy.json").write_text(json.dumps({"throughput_batch": 32, "speed_length": 128, "threads": 1,
                                                    "candidates": {"transformers fp32": candidate,
                                                                   "onnxruntime int8": candidate}}))


def finetune_run(folder: Path) -> None:
    """A finetune output_dir: another stage's artefact."""
    (folder / "folds").mkdir(parents=True)
    (folder / "folds/labels.json").write_text('["neg", "pos"]\n')
    (folder / "resolved_config.yaml").write_text("output_dir: run\n")


def stage_with(stage: str, broken: bytes | None) -> Callable[[Path], str]:
    """A maker of a config for `stage` whose output_dir copies the finished demo's, less the file the report reads
    from it (None) or with that file's bytes replaced by `broken`."""
    def build(folder: Path) -> None:
        root = folder.parent
        shutil.copytree(root / f"{stage} out", folder / "out")
        target = folder / "out" / OUTPUTS[stage]
        target.unlink()
        if broken is not None:
            target.write_bytes(broken)
        (folder / "config.yaml").write_text(json.dumps({"output_dir": str(folder / "out")}))

    def path(workspace: Path) -> str:
        return str(Path(_maker(f"configs.{stage}", "missing output" if broken is None else "broken output",
                               build)(workspace)) / "config.yaml")
    return path


def output_cases() -> list[Case]:
    """Each file read through a stage config: missing, and not UTF-8 (named with the file and the line)."""
    out = []
    for stage in OUTPUTS:
        field = f"configs.{stage}"
        out += [Case(f"{field}/{what}", (f"'{field}'",), config=((field, stage_with(stage, broken)),))
                for what, broken in (("output missing", None), ("output not UTF-8", b"[\n" + NOT_UTF8))]
    return out


def config_without_output_dir(path: Path) -> None:
    path.write_text("steps: 3\n")


CASES = (field_cases(ReportConfig, VALID) + path_cases("output_dir", "output", artefact=finetune_run)
         + path_cases("steps", "text") + [c for s in STAGES for c in path_cases(f"configs.{s}", "text")]
         + [Case(f"configs.{s}/no output_dir", (f"'configs.{s}'",),
                 config=((f"configs.{s}", _maker(f"configs.{s}", "no output_dir", config_without_output_dir)),))
            for s in STAGES]
         + output_cases() + flag_cases(stage_parser("report", REPORT_DOC)) + config_cases())
NOT_UTF8_FILES = {  # case -> (the file it makes, under the workspace; the line of its first bad byte)
    **{f"{f}/not UTF-8": (f"fuzz-{f.replace('.', '-')}-not-UTF-8", 1) for f in ["steps"] + [f"configs.{s}" for s in STAGES]},
    **{f"configs.{s}/output not UTF-8": (f"fuzz-configs-{s}-broken-output/out/{OUTPUTS[s]}", 2) for s in OUTPUTS}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("report fuzz")  # a space in every path
    finished_demo(root)
    return root


def test_the_valid_config_builds_a_report(workspace, tmp_path):
    config = tmp_path / "report.yaml"
    data = json.loads(json.dumps(VALID).replace("{root}", str(workspace)))
    config.write_text(json.dumps(dict(data, output_dir=str(tmp_path / "my report"))))
    code, printed = run_main(main, ["--config", str(config)])
    assert code == 0, printed
    assert (tmp_path / "my report/report.md").is_file()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_bad_field_is_refused_in_one_line(workspace, case):
    error = assert_refused(main, case, VALID, workspace)
    if case.label in NOT_UTF8_FILES:  # the file and the line of its first bad byte are named too
        file, line = NOT_UTF8_FILES[case.label]
        assert f"{workspace / file}: line {line}:" in error, error


STEP_CASES = [(c.label, c.argv, c.names) for c in flag_cases(steps_parser())] + [
    ("--seconds/negative", ("--seconds", "-5"), ("--seconds",)),
    ("--seconds/nan", ("--seconds", "nan"), ("--seconds",)),
    ("--file/a folder", ("--file", "{root}/teacher out"), ("--file",)),
    ("--file/not UTF-8", ("--file", "{root}/latin-1 steps.json"), ("--file",)),
    ("--file/not JSON", ("--file", "{root}/teacher.yaml.bak"), ("--file",))]


@pytest.mark.parametrize("label,argv,names", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_each_bad_flag_of_report_steps_is_refused_before_the_command_runs(workspace, label, argv, names):
    (workspace / "latin-1 steps.json").write_bytes(NOT_UTF8)
    (workspace / "teacher.yaml.bak").write_text("{not json")
    ran = workspace / "the command ran"
    before = digests(workspace)
    command = ["--", sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    valid = ["--file", str(workspace / "steps.json"), "--name", "teacher"]
    code, printed = run_main(steps_main, valid + [a.replace("{root}", str(workspace)) for a in argv] + command)
    errors = [line for line in printed.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and any(n in errors[0] for n in names), printed
    assert "Traceback" not in printed and digests(workspace) == before and not ran.exists()
