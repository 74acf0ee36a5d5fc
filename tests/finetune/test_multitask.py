"""Multi-task distillation: one student with a head per task, tasks sampled per step, each task's soft targets
from its own teacher; exports per task share the encoder; each task's report shows the multi-task arms."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.__main__ import main
from finetune.multitask_model import MultiTaskSampler
from kdlib.tasks.sampling import TaskSamplingConfig, task_probabilities
from tests.finetune_fixture import multitask_config, write_config


@pytest.fixture(scope="module")
def multitask(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-multitask")
    data = multitask_config(root)
    path = write_config(data, root / "config.yaml")
    assert main(["--config", str(path)]) == 0
    return root / "run", path


@pytest.mark.slow
def test_each_task_gets_a_plain_model_on_the_shared_encoder(multitask):
    from transformers import BertForSequenceClassification

    run, _ = multitask
    for fold in (0, 1):
        a = load_file(str(run / f"polarity/fold-{fold}/seed-0/multitask-kd/export/model.safetensors"))
        b = load_file(str(run / f"topic/fold-{fold}/seed-0/multitask-kd/export/model.safetensors"))
        encoder = [k for k in a if k.startswith("bert.")]
        assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
        assert a["classifier.weight"].shape == (2, 32) and b["classifier.weight"].shape == (3, 32)
    model = BertForSequenceClassification.from_pretrained(run / "topic/fold-0/seed-0/multitask-kd/export")
    assert model.config.id2label == {0: "politics", 1: "science", 2: "sport"}


@pytest.mark.slow
def test_held_out_predictions_are_the_exported_models(multitask):
    from transformers import BertForSequenceClassification

    from finetune.data import EncodedExamples
    from finetune.folds import read_split
    from kdlib.runtime.models import load_tokenizer

    run, _ = multitask
    folder = run / "topic/fold-1/seed-0/multitask-baseline"
    model = BertForSequenceClassification.from_pretrained(folder / "export").eval()
    test = EncodedExamples(read_split(run / "topic/folds/fold-1/test.jsonl"), load_tokenizer(str(folder / "export")),
                           ["politics", "science", "sport"], 32)
    batch = test.batch(list(range(len(test))))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    scores = torch.tensor([json.loads(line)["scores"] for line in (folder / "predictions.jsonl").read_text().splitlines()],
                          dtype=torch.float64)
    assert torch.allclose(scores, logits, rtol=0, atol=1e-5 * max(1.0, float(logits.abs().max())))


@pytest.mark.slow
def test_each_task_report_shows_the_multitask_arms(multitask):
    run, _ = multitask
    for task in ("polarity", "topic"):
        report = json.loads((run / task / "report/report.json").read_text())
        assert set(report["arms"]) == {"teacher", "multitask-kd", "multitask-baseline"}
        values = [json.loads((run / task / f"fold-{f}/seed-0/multitask-kd/eval.json").read_text())["metrics"]["accuracy"]
                  for f in (0, 1)]
        assert abs(report["arms"]["multitask-kd"]["metrics"]["accuracy"]["mean"] - np.mean(values)) < 1e-12


@pytest.mark.slow
def test_a_rerun_skips_the_finished_multitask_runs(multitask, capsys):
    run, path = multitask
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/fold-*/seed-*/multitask-*/eval.json")}
    assert len(before) == 8 and main(["--config", str(path)]) == 0
    assert "every task's eval.json present" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.glob("*/fold-*/seed-*/multitask-*/eval.json")} == before


def test_the_step_sampler_draws_one_task_per_step_and_resumes_exactly():
    sizes = [40, 10, 160]
    sampler = MultiTaskSampler(sizes, TaskSamplingConfig(alpha=0.5), micro_batch=4, grad_accum=2, rank=0,
                               world_size=1, seed=3)
    steps = [sampler.next_step() for _ in range(30)]
    saved = json.loads(json.dumps(sampler.state_dict()))
    ahead = copy.deepcopy(sampler)
    resumed = MultiTaskSampler(sizes, TaskSamplingConfig(alpha=0.5), micro_batch=4, grad_accum=2, rank=0,
                               world_size=1, seed=3)
    resumed.load_state_dict(saved)
    assert [resumed.next_step() for _ in range(50)] == [ahead.next_step() for _ in range(50)]
    for step in steps:
        tasks = {t for micro in step for t, _ in micro}
        assert len(tasks) == 1 and len(step) == 2 and all(len(m) == 4 for m in step)
        (task,) = tasks
        assert all(0 <= i < sizes[task] for micro in step for _, i in micro)
    many = MultiTaskSampler(sizes, TaskSamplingConfig(alpha=0.5), micro_batch=1, grad_accum=1, rank=0, world_size=1,
                            seed=0)
    draws = np.bincount([many.next_step()[0][0][0] for _ in range(3000)], minlength=3)
    p = task_probabilities(sizes, 0.5)  # sqrt sizes: 6.32 : 3.16 : 12.65
    assert np.all(np.abs(draws - 3000 * p) < 5 * np.sqrt(3000 * p * (1 - p)))
