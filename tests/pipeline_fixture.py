"""The tiny corpus config the pipeline's tests build, and how they run `python -m data_pipeline` as a user does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from kdlib.cache import read_manifest
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
TWO_WORKERS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def corpus_config(teacher: Path, out: Path, **over) -> dict:
    cfg = {
        "teacher": {"path": str(teacher), "task": "masked_lm"},
        "output_dir": str(out),
        "corpus": {"kind": "text", "path": "gensim:lee_background.cor", "text_mode": "line", "max_documents": 60},
        "max_length": 64,
        "augment": {"copies": 1, "mask_prob": 0.1, "pos_swap_prob": 0.1, "ngram_prob": 0.2, "seed": 3},
        "masking": {"prob": 0.15},
        "teacher_outputs": {"top_k": 8, "hidden_layers": [2], "pooled": "mean", "fidelity_positions": 256},
        "num_shards": 3, "pack_groups": 4, "batch_size": 16, "torch_threads": 1,
    }
    cfg.update(over)
    return cfg


def run_pipeline(tmp: Path, cfg: dict, beam_args=TWO_WORKERS, check=True, **popen) -> subprocess.CompletedProcess:
    path = tmp / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "--config", str(path), *beam_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def table(directory: Path):
    m = read_manifest(directory)
    return {s.name: pq.read_table(directory / s.file) for s in m.shards}


def assert_same_shards(expected: Path, actual: Path) -> None:
    """Same shard names, and every shard's rows and values identical."""
    a, b = table(expected), table(actual)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].equals(b[name]), name


