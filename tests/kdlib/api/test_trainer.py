"""DistillationTrainer against `python -m pretrain`: the same tiny transfer set and config, 2 processes each
(torchrun + DeepSpeed ZeRO-2 for the stage; `accelerate launch` + DDP for the Trainer, running
examples/distill_with_trainer.py). Same initial weights, batches per process, AdamW groups, schedule, clipping and
dropout seeds: the losses of every step and the exported weights agree to float32 rounding. Also: the API and the
Trainer run where DeepSpeed cannot be imported, the Trainer's DeepSpeed integration (ZeRO-2) trains bit for bit as the
stage does, a resumed Trainer continues exactly, and the
README's example runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdlib.runtime.metrics import read_metrics
from tests.transfer_fixture import (REPO, base_config, build_transfer_set, export_weights, free_port, run_pretrain,
                                    stage_env, write_config)

pytestmark = pytest.mark.slow  # every test here trains, in processes of its own

EPS = float(np.finfo(np.float32).eps)
EXAMPLE = REPO / "examples" / "distill_with_trainer.py"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_transfer_set(tmp_path_factory.mktemp("trainer_fixture"))  # 320 rows; the student keeps dropout 0.1


def accelerate_launch(script_args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` with `nproc` CPU processes (accelerate 1.15's --cpu starts one process whatever
    --num_processes says, unless given an MPI hostfile; --multi_gpu on a CPU-only machine starts gloo processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *script_args]
    return subprocess.run(cmd, cwd=REPO, env=stage_env({"CUDA_VISIBLE_DEVICES": ""}), capture_output=True, text=True,
                          timeout=600)


def example_args(paths, out: Path, *extra: str) -> list[str]:
    return [str(EXAMPLE), "--transfer-set", str(paths["transfer"]), "--teacher", str(paths["teacher"]),
            "--output-dir", str(out), *extra]


CONFIGS = {  # name: (python -m pretrain overrides of base_config, the example's flags for the same)
    "cached": ({}, []),
    "online_teacher": ({"online_teacher": True, "layer_map": {"name": "uniform"},
                        "objectives": [{"name": "attention_mse"}, {"name": "kd_topk", "weight": 0.5}]},
                       ["--online-teacher", "--layer-map", "uniform", "--objectives",
                        json.dumps([{"name": "attention_mse"}, {"name": "kd_topk", "weight": 0.5}])]),
}


@pytest.fixture(scope="module")
def stage_runs(paths, tmp_path_factory):
    """python -m pretrain (torchrun, 2 processes, ZeRO-2) once per named config: name -> run folder."""
    root, done = tmp_path_factory.mktemp("stage"), {}

    def run(name: str) -> Path:
        if name not in done:
            proc = run_pretrain(write_config(base_config(paths, root / name, **CONFIGS[name][0]), root / f"{name}.yaml"))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[name] = root / name
        return done[name]

    return run


TERMS_SKIP = ("kind", "step", "lr", "tokens", "tokens_per_s", "epoch")


def compare(stage: Path, trainer: Path) -> dict:
    """Per step: the loss, each term and the rate of both; per weight tensor of the student: the largest difference
    (the stage's export: its masked_lm/ model, every weight it trained; the top adds the teacher's pooler)."""
    a, b = read_metrics(stage / "metrics.jsonl"), read_metrics(trainer / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    mine = load_file(str(trainer / "export" / "model.safetensors"))
    theirs = export_weights(stage / "export")
    assert set(mine) == set(theirs)
    return {"stage": a, "trainer": b, "weights": {k: float((mine[k] - theirs[k]).abs().max()) for k in mine},
            "scale": max(float(v.abs().max()) for v in theirs.values())}


def report(found: dict) -> str:
    lines = []
    for x, y in zip(found["stage"], found["trainer"]):
        terms = [k for k in x if k not in TERMS_SKIP]
        lines.append(f"step {x['step']}: lr {x['lr']} / {y['lr']}; " + ", ".join(
            f"{k} {x[k]!r} / {y[k]!r} ({abs(x[k] - y[k]) / (EPS * abs(x[k])):.1f} ulp)" for k in terms))
    worst = max(found["weights"], key=found["weights"].get)
    lines.append(f"weights: {sum(d > 0 for d in found['weights'].values())} of {len(found['weights'])} tensors differ; "
                 f"largest difference {found['weights'][worst]:.3g} in {worst} "
                 f"({found['weights'][worst] / (EPS * found['scale']):.1f} ulp of the largest weight {found['scale']:.3g})")
    return "\n".join(lines)


def check_equal(found: dict, *, exact: bool = False) -> None:
    """The bounds are float32 rounding. Step 1 is the same forward on the same rows: identical. Later steps differ
    only where gradients are summed, averaged and clipped in another order (DDP's one all-reduce against ZeRO-2's
    reduce-scatter per micro-batch): each logged value within 64 ulps of its magnitude, each weight within 64 ulps
    of the model's largest weight (~1, the LayerNorm gains: Adam turns a rounding-level gradient, as the attention
    key biases get, into an update of its own size, so a tensor's own scale is no bound). `exact`: bit for bit."""
    print(report(found))
    for x, y in zip(found["stage"], found["trainer"]):
        assert x["lr"] == y["lr"], (x, y)
        for key in [k for k in x if k not in TERMS_SKIP]:
            bound = 0.0 if exact or x["step"] == 1 else 64 * EPS * abs(x[key])
            assert abs(x[key] - y[key]) <= bound, (key, x, y, bound)
    for name, diff in found["weights"].items():
        assert diff <= (0.0 if exact else 64 * EPS * found["scale"]), (name, diff, found["scale"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trainer_under_accelerate_trains_as_the_stage(paths, stage_runs, tmp_path, name):
    proc = accelerate_launch(example_args(paths, tmp_path / "trainer", *CONFIGS[name][1]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 6 steps" in proc.stdout
    check_equal(compare(stage_runs(name), tmp_path / "trainer"))


DS_ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}


def test_trainer_with_its_deepspeed_integration_trains_as_the_stage(paths, stage_runs, tmp_path):
    config = tmp_path / "ds_zero2.json"
    config.write_text(json.dumps(DS_ZERO2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *example_args(paths, tmp_path / "trainer", "--deepspeed", str(config))]
    proc = subprocess.run(cmd, cwd=REPO, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the same engine on both sides (DeepSpeed ZeRO-2, the same AdamW, schedule, clipping and reductions): bit for bit
    check_equal(compare(stage_runs("cached"), tmp_path / "trainer"), exact=True)


NO_DEEPSPEED = r"""
import sys
sys.modules["deepspeed"] = None  # `import deepspeed` raises ImportError in this process
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, TrainingArguments
from kdlib.api import Distillation, TransferSet

root, out = sys.argv[1], sys.argv[2]
ts = TransferSet(root + "/transfer")
config = AutoConfig.from_pretrained(root + "/teacher")
config.num_hidden_layers = 2
torch.manual_seed(0)
student = AutoModelForMaskedLM.from_config(config)
kd = Distillation([{"name": "kd_topk"}, {"name": "mlm_ce", "weight": 0.5}, {"name": "pooled_cosine"}],
                  teacher=root + "/teacher", student=student, transfer_set=ts)
optimizer = torch.optim.AdamW(list(student.parameters()) + list(kd.parameters()), lr=1e-3)
loader = torch.utils.data.DataLoader(ts, batch_size=8, shuffle=True, collate_fn=ts.collator)
losses = []
for step, batch in zip(range(3), loader):
    total, terms = kd(kd.run_student(student, batch), batch, step=step, total_steps=3)
    total.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(total.item())
print("manual", losses, sorted(terms))
assert [m for m in sys.modules if m.startswith("deepspeed") and sys.modules[m] is not None] == []
from kdlib.api import DistillationTrainer
train, _ = ts.split(64)
args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                         save_strategy="no", disable_tqdm=True)
trainer = DistillationTrainer(model=student, args=args, distillation=kd, train_dataset=train)
trainer.train()
print("trainer", [r["loss"] for r in trainer.history])
assert [m for m in sys.modules if m.startswith("deepspeed") and sys.modules[m] is not None] == []
"""


def test_api_and_trainer_run_where_deepspeed_cannot_be_imported(paths, tmp_path):
    script = tmp_path / "no_deepspeed.py"
    script.write_text(NO_DEEPSPEED)
    proc = subprocess.run([sys.executable, str(script), str(paths["transfer"].parent), str(tmp_path / "out")],
                          cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manual = re.search(r"manual \[(.*)\] \['kd_topk', 'mlm_ce', 'pooled_cosine'\]", proc.stdout)
    trained = re.search(r"trainer \[(.*)\]", proc.stdout)
    assert manual and trained, proc.stdout[-2000:]
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in manual.group(1).split(", "))
    assert len(trained.group(1).split(", ")) == 2


def readme_python() -> str:
    """The fenced python blocks of README.md's "Use it from Python" section, as written."""
    section = (REPO / "README.md").read_text().split("\n## Use it from Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    return "\n".join(blocks)


def test_readme_example_runs_as_written(paths, tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(readme_python())
    out = tmp_path / "student"
    env = stage_env({"KD_TRANSFER_SET": str(paths["transfer"]), "KD_TEACHER": str(paths["teacher"]),
                     "KD_OUTPUT": str(out), "KD_STEPS": "3", "HF_DATASETS_CACHE": str(tmp_path / "hf")})
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^320 [0-9a-f]{12} ", proc.stdout, flags=re.M)
    terms = re.search(r"\{'kd_topk': ([0-9.]+), 'mlm_ce': ([0-9.]+)\}", proc.stdout)
    assert terms and float(terms.group(1)) > 0 and float(terms.group(2)) > 0
    assert re.search(r"'kind': 'train', 'step': 3, 'loss': [0-9.]+", proc.stdout)
    assert "320 fixture ['id', 'source_id', 'augmentation', 'input_ids', 'mlm_positions', 'mlm_labels', 'topk_ids', " \
           "'topk_logits', 'lse']" in proc.stdout
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2
    assert not any(k.startswith(("projections", "distillation")) for k in load_file(str(out / "model.safetensors")))


def _resumable_run(api_paths, out: Path, steps: int, resume: str | None = None):
    from transformers import AutoConfig, BertForMaskedLM, TrainingArguments

    from kdlib.api import Distillation, DistillationTrainer, TransferSet
    from kdlib.training.deepspeed_engine import OptimConfig

    ts = TransferSet(api_paths["transfer"])
    config = AutoConfig.from_pretrained(str(api_paths["teacher"]))
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 16, 32
    torch.manual_seed(0)
    student = BertForMaskedLM(config)
    kd = Distillation([{"name": "hidden_mse"}, {"name": "kd_topk"}], student=student, transfer_set=ts,
                      layer_map={"name": "uniform"})
    train, _ = ts.split(16)
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, save_strategy="steps", save_steps=2, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=3)
    trainer = DistillationTrainer(model=student, args=args, distillation=kd, train_dataset=train,
                                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=1))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_a_resumed_trainer_continues_with_its_projections(api_paths, tmp_path):
    whole = _resumable_run(api_paths, tmp_path / "whole", 4)
    assert sorted(load_file(str(tmp_path / "whole" / "checkpoint-2" / "distillation.safetensors"))) == \
        ["distillation.projections.hidden.bias", "distillation.projections.hidden.weight"]
    resumed = _resumable_run(api_paths, tmp_path / "whole_copy", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert [r["step"] for r in resumed.history] == [3, 4]
    for a, b in zip(whole.history[2:], resumed.history):
        assert a == b  # the same float64 values: weights, projections, optimizer, schedule and order restored
    assert torch.equal(whole.distillation.projections.hidden.weight, resumed.distillation.projections.hidden.weight)


def test_evaluate_reports_the_distillation_loss_of_the_held_out_rows(api_paths, tmp_path):
    from kdlib.api import TransferSet

    trainer = _resumable_run(api_paths, tmp_path / "run", 4)
    kd, ts = trainer.distillation, TransferSet(api_paths["transfer"])
    held = list(range(80, 96))
    metrics = trainer.evaluate(torch.utils.data.Subset(ts, held))  # 2 batches of 8 (the default eval batch)
    student = trainer.student.eval()
    with torch.no_grad():
        totals = [kd(kd.run_student(student, batch), batch, step=4, total_steps=4).total.item()
                  for batch in (ts.batch(held[i:i + 8]) for i in (0, 8))]
    assert metrics["eval_loss"] == pytest.approx(sum(totals) / 2, rel=1e-6)


def test_the_datasets_form_trains_exactly_as_the_torch_form(api_paths, tmp_path):
    from transformers import AutoConfig, BertForMaskedLM, TrainingArguments

    from kdlib.api import Distillation, DistillationTrainer, TransferSet

    def run(form: str) -> list[dict]:
        ts = TransferSet(api_paths["transfer"])
        config = AutoConfig.from_pretrained(str(api_paths["teacher"]))
        config.num_hidden_layers = 2
        torch.manual_seed(0)
        student = BertForMaskedLM(config)
        kd = Distillation([{"name": "kd_topk"}, {"name": "pooled_cosine"}], student=student, transfer_set=ts)
        train = ts.split(16)[0] if form == "torch" else \
            ts.to_hf(keys=kd.reads, cache_dir=str(tmp_path / "hf")).select(range(80))
        args = TrainingArguments(output_dir=str(tmp_path / form), max_steps=3, per_device_train_batch_size=8,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
        trainer = DistillationTrainer(model=student, args=args, distillation=kd, train_dataset=train)
        trainer.train()
        return trainer.history

    hf_history = run("datasets")
    assert hf_history == run("torch") and [r["step"] for r in hf_history] == [1, 2, 3]
