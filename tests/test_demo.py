"""`scripts/demo.sh` end to end on shrunken copies of the shipped configs: a tiny encoder, a few documents, a few steps.

Every step runs as `make demo` runs it (the real stages, Beam, DeepSpeed on 2 CPU processes through the local
launcher, onnxruntime); then the report folder must hold every file, and every number in report.md must equal the
number in the metrics file it names (report.numbers.verify, plus a few read back by hand here).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from report.numbers import numbers_in, verify
from tests.finetune_fixture import write_task
from tests.tiny_models import make_tiny_bert

pytestmark = pytest.mark.slow  # every test here starts DeepSpeed, Beam or SLURM, or trains

ROOT = Path(__file__).resolve().parent.parent
CORPUS = {"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line"}


def shipped(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def shrink(root: Path) -> Path:
    """Copies of the shipped demo configs in root/configs, pointed at tiny inputs and root/runs."""
    runs, configs = root / "runs", root / "configs"
    configs.mkdir()
    encoder = make_tiny_bert(root / "encoder", task="base", layers=6, hidden=32, heads=4, intermediate=64)
    task = write_task(root / "task.txt", examples=40)
    teacher_mlm = str(runs / "teacher_mlm")

    teacher = shipped("demo_teacher.yaml") | {
        "encoder": str(encoder), "output_dir": teacher_mlm, "corpus": CORPUS, "steps": 30, "max_sequences": 120,
        "eval_sequences": 16, "positions_per_step": 256}
    pipeline = shipped("demo_pipeline.yaml")
    pipeline.update({"teacher": {"path": teacher_mlm, "task": "masked_lm"}, "output_dir": str(runs / "transfer_set"),
                     "corpus": CORPUS | {"max_documents": 60}, "num_shards": 2, "batch_size": 8, "pack_groups": 4})
    pipeline["teacher_outputs"] |= {"top_k": 8, "fidelity_positions": 256}
    pretrain = shipped("pretrain_demo.yaml")
    pretrain.update({"teacher": {"path": teacher_mlm, "task": "masked_lm"}, "transfer_set": str(runs / "transfer_set"),
                     "output_dir": str(runs / "pretrain"), "steps": 6, "eval_every": 3, "checkpoint_every": 3,
                     "eval_rows": 16})
    pretrain["engine"] |= {"micro_batch": 4}
    evaluate = shipped("evaluate_demo.yaml")
    evaluate.update({"models": {"teacher": teacher_mlm, "untrained": str(runs / "pretrain_untrained"),
                                "student": str(runs / "pretrain" / "export")},
                     "transfer_set": str(runs / "transfer_set"), "output_dir": str(runs / "evaluation")})
    evaluate["heldout"] |= {"max_sequences": 16}
    evaluate["speed"] = {"batch_size": 4, "length": 32, "threads": 1, "repeats": 1}
    finetune = shipped("finetune_demo.yaml")
    finetune.update({"output_dir": str(runs / "finetune"), "task": {"kind": "fasttext", "path": str(task)},
                     "max_length": 32, "student": {"path": str(runs / "pretrain" / "export")}})
    finetune["teacher"] |= {"init": str(encoder), "steps": 20, "eval_every": 5, "patience": 2}
    finetune["teacher"]["engine"] |= {"micro_batch": 8, "optim": {"learning_rate": 3e-3, "warmup_steps": 2}}
    finetune["transfer"] |= {"augment_model": teacher_mlm, "num_shards": 2}
    finetune["transfer"]["augment"] |= {"copies": 1}
    finetune["distill"] |= {"steps": 10, "eval_every": 5}
    finetune["distill"]["engine"] |= {"micro_batch": 8, "optim": {"learning_rate": 3e-3, "warmup_steps": 2}}
    finetune["deploy"] |= {"speed_length": 32, "speed_batches": [1, 4]}
    finetune["evaluation"] |= {"folds": 2, "seeds": [0], "speed_batch": 4}
    finetune["threads"] = 1
    report = shipped("demo_report.yaml")
    report.update({"output_dir": str(runs / "report"), "steps": str(runs / "steps.json"),
                   "configs": {k: str(configs / Path(v).name) for k, v in report["configs"].items()}})
    for name, data in [("demo_teacher.yaml", teacher), ("demo_pipeline.yaml", pipeline), ("pretrain_demo.yaml", pretrain),
                       ("evaluate_demo.yaml", evaluate), ("finetune_demo.yaml", finetune), ("demo_report.yaml", report)]:
        (configs / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return configs


def run_demo(root: Path, configs: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"DEMO_CONFIGS": str(configs), "DEMO_RUNS": str(root / "runs"),
                        "DEMO_TEACHER": str(root / "encoder"), "DEMO_CORPUS": "text:gensim:lee_background.cor"}
    return subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    configs = shrink(root)
    result = run_demo(root, configs)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, result


def test_demo_prints_the_report_and_the_folder_holds_every_file(demo):
    root, result = demo
    report = root / "runs" / "report"
    assert result.stdout.strip().splitlines()[-1] == f"== done: {report}/report.md"
    text = (report / "report.md").read_text()
    for png in ["general_evaluation.png", "task_metrics.png", "speed_size.png", "steps.png", "loss_teacher.png",
                "loss_general.png", "loss_task.png"]:
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in text, png
    for heading in ["## Targets", "## The general student against the teacher", "## Task distillation: polarity",
                    "## Speed and size on this CPU", "## Loss curves of every training stage",
                    "## Time per step here, and how to scale each"]:
        assert heading in text
    for row in ["| teacher |", "| untrained |", "| student |", "| KD student |", "| no-KD baseline |",
                "| int8 KD student (onnxruntime) |", "| transformers fp32 |", "| onnxruntime int8 |"]:
        assert row in text, row
    assert "python -m launch slurm --config" in text and "sbatch --array=" in text


def test_every_number_in_the_report_equals_its_source(demo):
    root, _ = demo
    report = root / "runs" / "report"
    assert verify(report) == []
    entries = json.loads((report / "numbers.json").read_text())
    assert len(entries) > 60
    # A few by hand, straight from the stage outputs.
    evaluation = json.loads((root / "runs" / "evaluation" / "evaluation.json").read_text())
    cosine = evaluation["models"]["student"]["metrics"]["pooled_cosine"]
    task = json.loads((root / "runs" / "finetune" / "report" / "report.json").read_text())
    kd = task["arms"]["kd"]["metrics"]["accuracy"]
    text = (report / "report.md").read_text()
    assert f"| general student: pooled cosine to the teacher | ≥ 0.95 | {cosine:.4f} |" in text
    assert f"| KD student | {kd['mean']:.4f} ± {kd['std']:.4f} |" in text
    steps = json.loads((root / "runs" / "steps.json").read_text())
    total = sum(s["work_seconds"] for name, s in steps.items()) / 60
    assert f"| **all steps** | **{total:.1f}** |" in text


def test_verify_catches_a_number_that_differs_or_has_no_source(demo):
    root, _ = demo
    report = root / "runs" / "report"
    text = (report / "report.md").read_text()
    first = next(e for e in json.loads((report / "numbers.json").read_text()) if re.fullmatch(r"0\.\d{4}", e["shown"]))
    bad = report.parent / "report_bad"
    bad.mkdir()
    (bad / "numbers.json").write_text((report / "numbers.json").read_text())
    wrong = f"{float(first['shown']) + 0.0001:.4f}"
    (bad / "report.md").write_text(text.replace(first["shown"], wrong, 1))
    problems = verify(bad)
    assert any(wrong in p for p in problems) and any(first["shown"] in p for p in problems)
    (bad / "report.md").write_text(text + "\nAn extra claim: 12.5 points.\n")
    assert verify(bad) == ["report.md shows 12.5 1 time(s) more than any source gives it"]
    assert numbers_in("`--nodes 4` ZeRO-2 int8 fp32 top-32 x 0.5 1,234,567, 98.8% 2.05x") == ["0.5", "1,234,567", "98.8", "2.05"]


def test_every_step_is_timed_and_a_rerun_skips_finished_work(demo):
    root, _ = demo
    steps = json.loads((root / "runs" / "steps.json").read_text())
    assert list(steps) == ["setup", "teacher", "transfer_set", "general_distillation", "general_evaluation",
                           "task_distillation", "int8_export"]
    assert all(s["returncode"] == 0 and s["work_seconds"] >= s["seconds"] >= 0 for s in steps.values())
    # Steps that find their outputs complete skip the work; setup is timed, not run; the evaluation and the int8
    # table measure speed again on every run (their timings are of this machine now), so they are not compared.
    # General distillation resumes a finished run at its last checkpoint and re-evaluates and re-exports it: on
    # these tiny shapes that costs about what the training did, so its proof of skipping is its training log.
    skipping = ("teacher", "transfer_set", "task_distillation")
    first = {k: steps[k]["work_seconds"] for k in skipping}
    log = root / "runs" / "pretrain" / "metrics.jsonl"
    trained = [line for line in log.read_text().splitlines() if '"kind": "train"' in line]
    assert len(trained) == 6
    again = run_demo(root, root / "configs")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = json.loads((root / "runs" / "steps.json").read_text())
    assert {k: steps[k]["work_seconds"] for k in skipping} == first  # the first runs did the work
    assert all(s["runs"] == 2 for s in steps.values())
    assert [line for line in log.read_text().splitlines() if '"kind": "train"' in line] == trained
    assert verify(root / "runs" / "report") == []
