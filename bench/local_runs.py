"""Training runs a benchmark starts (`python -m launch local --nproc 2`, or a stage such as `python -m finetune`) on
this machine, offline, logged."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    """The environment of a CPU training run with no network."""
    out = dict(os.environ)
    out.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return out


def launch_local(args: list[str], log: Path, what: str) -> float:
    """Run `python -m launch local --nproc 2 <args>`, its output kept in `log`; seconds taken, or SystemExit
    naming `what` and the log when it fails."""
    return run_logged(["-m", "launch", "local", "--nproc", "2", *args], log, what)


def run_logged(args: list[str], log: Path, what: str) -> float:
    """Run `python <args>` from the repository root (a stage: `-m finetune ...`), its output kept in `log`; seconds
    taken, or SystemExit naming `what` and the log when it fails."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}); log in {log}:\n{proc.stderr[-3000:]}")
    return time.time() - t0
