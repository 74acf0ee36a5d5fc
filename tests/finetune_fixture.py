"""A tiny labelled task, a tiny encoder, and finetune configs over them, for the finetune tests.

The task is 40 short sentences whose label is carried by a sentiment word, so even a tiny model can
learn it; the encoder is a 4-layer, 32-wide BERT built offline (tests/tiny_models.py)."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from tests.tiny_models import make_tiny_bert

POSITIVE = "good great fine excellent happy love best wonderful".split()
NEGATIVE = "bad awful poor terrible sad hate worst boring".split()
FILLER = "the movie was a and it film story plot of in".split()


def write_task(path: Path, examples: int = 40, seed: int = 0) -> Path:
    """fastText lines, labels alternating neg/pos (so every class has examples // 2)."""
    rng = random.Random(seed)
    lines = []
    for i in range(examples):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(POSITIVE if i % 2 else NEGATIVE) for _ in range(2)]
        rng.shuffle(words)
        lines.append(f"__label__{label} " + " ".join(words))
    path.write_text("\n".join(lines) + "\n")
    return path


def engine(micro_batch: int = 4, lr: float = 3e-3) -> dict:
    return {"zero_stage": 0, "micro_batch": micro_batch, "optim": {"learning_rate": lr, "warmup_steps": 2}}


def base_config(root: Path, *, copies: int = 0, objectives=None, folds: int = 2, **distill) -> dict:
    """A finetune config (as a dict) over the tiny task and encoder in `root` (made if missing)."""
    encoder = root / "encoder"
    if not encoder.is_dir():
        make_tiny_bert(encoder, task="masked_lm", layers=4, hidden=32, heads=4, seed=0)
    task = root / "task.txt"
    if not task.is_file():
        write_task(task)
    return {"output_dir": str(root / "run"), "task": {"kind": "fasttext", "path": str(task)}, "max_length": 32,
            "teacher": {"init": str(encoder), "steps": 30, "eval_every": 5, "patience": 2, "engine": engine()},
            "transfer": {"augment": {"copies": copies, "seed": 0}, "num_shards": 2},
            "student": {"shape": {"num_layers": 2, "init": "every_other"}},
            "distill": {"steps": 24, "eval_every": 8, "engine": engine(),
                        "objectives": objectives or [{"name": "kd_kl", "weight": 0.5, "params": {"temperature": 2.0}},
                                                     {"name": "hard_ce", "weight": 0.5}], **distill},
            "evaluation": {"folds": folds, "seeds": [0]}, "threads": 1, "progress_bar": False}


def write_config(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


TOPICS = {"sport": "goal match team score player".split(), "politics": "vote election party law senate".split(),
          "science": "atom cell energy theory experiment".split()}


def write_topic_task(path: Path, examples: int = 30, seed: int = 1) -> Path:
    """A second tiny task for multi-task tests: three topics, JSON lines."""
    import json

    rng = random.Random(seed)
    names = sorted(TOPICS)
    lines = []
    for i in range(examples):
        topic = names[i % 3]
        words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(TOPICS[topic]) for _ in range(2)]
        rng.shuffle(words)
        lines.append(json.dumps({"sentence": " ".join(words), "topic": topic}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_score_task(path: Path, examples: int = 40, seed: int = 2) -> Path:
    """A tiny regression task: the score is the number of positive minus negative words (JSON lines)."""
    import json

    rng = random.Random(seed)
    lines = []
    for i in range(examples):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        words = [rng.choice(FILLER) for _ in range(4)] + rng.sample(POSITIVE, good) + rng.sample(NEGATIVE, bad)
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "score": f"{good - bad + rng.uniform(-0.2, 0.2):.3f}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def kill_at_first_checkpoint(command: list[str], checkpoints: Path, log: Path, timeout: float = 240) -> int:
    """Run `python -m finetune <command>` in its own process group, SIGKILL the group as soon as `checkpoints/latest`
    exists, and return the step of that checkpoint (the run must still be going when it appears)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", *command], env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while not (checkpoints / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "latest").exists(), log.read_text()[-3000:]
    return int((checkpoints / "latest").read_text().strip().split("-")[-1])


def multitask_config(root: Path) -> dict:
    """base_config with two tasks: the polarity task and the three-topic task (no single-task students)."""
    data = base_config(root, copies=0)
    topic = write_topic_task(root / "topic.jsonl")
    data["tasks"] = [{"name": "polarity", "task": data.pop("task")},
                     {"name": "topic", "task": {"kind": "jsonl", "path": str(topic), "text_column": "sentence",
                                                "label_column": "topic"}}]
    data["multitask"] = {"sampling": {"alpha": 0.5}, "single_task": False}
    return data
