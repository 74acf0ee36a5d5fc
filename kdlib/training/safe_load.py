"""DeepSpeed's checkpoint files loaded with `torch.load(weights_only=True)`: tensors, containers and numbers,
plus the few DeepSpeed classes its checkpoints really hold (`ALLOWED_GLOBALS`), and nothing that runs code.

DeepSpeed 0.19.8 itself unpickles them (`weights_only=False`): in its TorchCheckpointEngine (resume), in
zero_to_fp32 (the fp32 consolidation at export) and in the universal checkpoint's conversion and load (resume
at another world size). Here:
- `install(engine)` swaps the engine's checkpoint engine for `SafeCheckpointEngine` right after
  `deepspeed.initialize`; every file `engine.load_checkpoint` reads at the saved world size goes through its
  `load` (model states, ZeRO optimizer partitions).
- `weights_only_loads()` is for the DeepSpeed code that calls `torch.load` itself (zero_to_fp32,
  ds_to_universal, the universal load): for the duration of our call only, `torch.load` is replaced by a
  wrapper that passes `weights_only=True`. (Process-wide while it lasts; our processes load nothing else then.)
A file that needs anything outside the allow-list (a planted pickle, a file from another tool) is a KDError
naming the file and the global. The digests (kdlib/runtime/digests.py) are still checked first.

The allow-list, read from the "Unsupported global" errors of real checkpoints saved by our loop with ZeRO
0-3 in fp32, bf16 and fp16 (and their universal copies): ZeRO 0 files need none. The allowed classes are
rebuilt by the restricted unpickler as plain objects (`__new__` and their saved attributes, an enum by its
value); none of their code runs while loading.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re
from typing import Iterator

import torch

from kdlib.errors import KDError

ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizer partitions, fp32 and bf16: the static scaler
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same, fp16 (dynamic loss scaling)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3 optimizer partitions: the stage that wrote them
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2 optimizer partitions: param_slice_mappings
)

_TORCH_LOAD = torch.load  # the real one, also while weights_only_loads() has replaced torch.load


@functools.lru_cache(maxsize=None)
def allowed_globals() -> tuple:
    """The objects ALLOWED_GLOBALS names (imports deepspeed, ~0.6 s, on the first call)."""
    found = []  # imported here, not at the top: checkpoints.py imports this module and loads deepspeed only on use
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attr))
    return tuple(found)


def load_weights_only(path, map_location=None, **kwargs):
    """torch.load(path, weights_only=True) with ALLOWED_GLOBALS; KDError naming the file (and the global) when
    the file needs anything else."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(err)) or re.search(r"(.+)", str(err) or "?")
        why = (f"needs the global {found.group(1)}, which is not among what a DeepSpeed checkpoint holds" if found
               else f"does not load as weights only ({reason.group(1).strip()[:200]})")
        raise KDError(f"{os.fspath(path) if isinstance(path, (str, os.PathLike)) else path}: {why}; refusing to "
                      f"unpickle it (allowed besides tensors and containers: {', '.join(ALLOWED_GLOBALS)})") from None


def _torch_checkpoint_engine():
    # deepspeed: ~0.6 s to import on top of torch; checkpoints.py imports this module, and loads deepspeed on use
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine


@functools.lru_cache(maxsize=None)
def safe_checkpoint_engine_class():
    """SafeCheckpointEngine: DeepSpeed's TorchCheckpointEngine with `load` through load_weights_only (saving is
    unchanged). Built on first use so that importing this module does not import deepspeed."""

    class SafeCheckpointEngine(_torch_checkpoint_engine()):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location=map_location)

    return SafeCheckpointEngine


def install(engine) -> None:
    """Replace `engine.checkpoint_engine` (DeepSpeed's default TorchCheckpointEngine, created in
    `deepspeed.initialize`) by SafeCheckpointEngine, keeping its serialization setting. Call it before
    `engine.load_checkpoint`. Another checkpoint engine (a deepspeed_json `checkpoint.writer` or `datastates`)
    is refused: its loads would not be checked."""
    current = engine.checkpoint_engine
    if type(current) is not _torch_checkpoint_engine():
        raise KDError(f"deepspeed_json: DeepSpeed's checkpoint engine is {type(current).__name__}; only its default "
                      f"TorchCheckpointEngine is supported (checkpoints load with weights_only=True); drop "
                      f"`checkpoint.writer` / `datastates` from the JSON")
    safe = safe_checkpoint_engine_class().__new__(safe_checkpoint_engine_class())
    safe.__dict__.update(current.__dict__)  # name, zipfile_serialization: as DeepSpeed configured them
    engine.checkpoint_engine = safe


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While it lasts, every `torch.load` (DeepSpeed's zero_to_fp32 and universal checkpoint call it directly,
    with weights_only=False) goes through load_weights_only. Not reentrant across threads: use it around one
    call in the main thread."""
    @functools.wraps(_TORCH_LOAD)
    def forced(f, map_location=None, pickle_module=None, **kwargs):
        if pickle_module is not None:
            raise KDError(f"{f}: loaded with a custom pickle module; refusing (checkpoints load weights only)")
        return load_weights_only(f, map_location=map_location, **kwargs)

    previous, torch.load = torch.load, forced
    try:
        yield
    finally:
        torch.load = previous
