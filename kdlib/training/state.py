"""Our part of a checkpoint, as JSON side files (never pickles): trainer state and per-rank RNG states.

`trainer_state.json` (rank 0): step, sampler state, loss-side state, config hash, the world size and global
batch it was trained at, and the resolved config.
`rng-rank-<r>.json` (each rank): torch (CPU and CUDA), numpy and python RNG states, so dropout
after a resume draws exactly the masks the uninterrupted run drew. After a resume at another world size a
rank restores its own file when the checkpoint has one (ranks below the old size); a rank beyond the old
size has none and is seeded from (seed, rank, step) (kdlib.training.loop.seed_new_rank).
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch

from kdlib.config import to_dict
from kdlib.errors import FingerprintMismatch, KDError

TRAINER_STATE = "trainer_state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank:05d}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state_json() -> str:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": _b64(torch.get_rng_state()),
             "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
             "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": [version, list(py_state), py_gauss]}
    return json.dumps(state)


def restore_rng_state(text: str) -> None:
    state = json.loads(text)
    torch.set_rng_state(_unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def write_trainer_state(state: dict, config) -> str:
    """The trainer's state_dict plus the resolved config, as the checkpoint's trainer_state.json."""
    return json.dumps({**state, "config": to_dict(config)}, indent=1)


def read_trainer_state(folder: Path, math_hash: str, steps: int) -> dict:
    """The saved trainer state; refuses a checkpoint written under a config that computes differently."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise KDError(f"{folder}: no {TRAINER_STATE}; not a checkpoint written by this trainer")
    state = json.loads(path.read_text())
    if state["config_hash"] != math_hash:
        why = ""
        if state.get("steps") not in (None, steps) and state.get("reads_total_steps"):
            why = (f" steps changed from {state['steps']} to {steps}, and {', '.join(state['reads_total_steps'])} "
                   "read the run's total steps (their schedules would change mid-run);")
        raise FingerprintMismatch(
            f"{folder}: the checkpoint was written under config hash {state['config_hash']} but this config "
            f"hashes to {math_hash};{why} only bookkeeping fields (output_dir, steps when no objective reads it, "
            f"checkpoint_every, keep_checkpoints, log_every, eval_every, progress_bar, threads, resume, prefetch) may "
            f"change on resume (use a new output_dir to start over)")
    return state


def check_world(folder: Path, state: dict, world_size: int, global_batch: int) -> int:
    """The world size the checkpoint was saved at (taken to be this one in checkpoints older than the record);
    refuses one trained with another global batch, under which every step's rows and gradient would change."""
    saved_world = int(state.get("world_size", world_size))
    saved_batch = state.get("global_batch")
    if saved_batch is not None and int(saved_batch) != global_batch:
        raise FingerprintMismatch(
            f"{folder}: the checkpoint was trained with a global batch of {saved_batch} sequences at world size "
            f"{saved_world}, but this run's is {global_batch} at world size {world_size}; every step's rows and "
            f"gradient would change. Resume on {saved_world} rank(s); for a run that may change its node count, set "
            f"engine.global_batch (grad_accum then follows the world size), in a new output_dir")
    return saved_world
