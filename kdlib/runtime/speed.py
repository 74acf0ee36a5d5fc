"""Model size and inference throughput, measured so that two models can be compared fairly.

A speed-up claim ("the student is 3.1x faster") is only meaningful when both models ran on the same
batches, with the same thread count, on the same machine at the same time. `compare_speed` does exactly
that: it interleaves the models repeat by repeat, so a slow moment of the machine (another job, thermal
throttling) falls on all of them rather than on one.

Timing is best-of-repeats: on a shared machine, interference only ever adds time, so the fastest pass is
the least contaminated estimate of what the model itself costs (the reasoning of Python's `timeit`).
A median would fold a share of the interference into the number and make ratios depend on load.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Callable, Iterator, Mapping

import torch


def resident_peak_kib() -> int:
    """This process's resident-set peak in KiB (Linux VmHWM). Not ru_maxrss: Linux carries a parent's peak
    across exec, so a child started by a large process would see no growth of its own."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def resident_kib() -> int:
    """This process's resident set now, in KiB (Linux VmRSS)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def reset_resident_peak() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0: writing 5 to /proc/self/clear_refs), so the
    next resident_peak_kib() is the peak of what runs after this call alone."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter values; a tied weight (input embeddings = output decoder) is counted once,
    because `Module.parameters()` yields each shared tensor once."""
    return int(sum(p.numel() for p in model.parameters()))


def _validate(batches: list[dict], threads: int, warmup: int, repeats: int) -> int:
    """Rows of the first batch (the reported batch size; a last, partial batch may be smaller)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup: expected an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    for i, batch in enumerate(batches):
        if "input_ids" not in batch or batch["input_ids"].ndim != 2:
            raise ValueError(f"batches[{i}]: expected an 'input_ids' tensor of shape (batch, sequence)")
    return int(batches[0]["input_ids"].shape[0])


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for the block (0: left as it is) and restored afterwards, even on error."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the measurement; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _one_pass(model: torch.nn.Module, batches: list[dict], device: torch.device) -> float:
    """Seconds for one forward pass over every batch (asynchronous devices are synchronised first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for batch in batches:
        model(**batch)
    sync()
    return time.perf_counter() - start


def compare_calls(passes: Mapping[str, Callable[[], object]], threads: int, *, warmup: int = 1,
                  repeats: int = 3) -> dict[str, float]:
    """Best-of-repeats seconds of each `passes[name]()` (one timed pass over the caller's batches), interleaved.

    The scheduling core of `compare_speed`, for anything callable (an onnxruntime session as much as a torch
    module): torch's thread count is set for the block, each pass runs `warmup` times untimed, then the passes
    take turns, starting with a different one each repeat. A callable with its own thread pool (onnxruntime)
    must be built with the same `threads`; that is the caller's part.
    """
    _validate([{"input_ids": torch.zeros((1, 1))}], threads, warmup, repeats)
    if not passes:
        raise ValueError("models: expected at least one model, got none")
    names = list(passes)
    best = {name: float("inf") for name in names}
    with torch_threads(threads), torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                passes[name]()
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                passes[name]()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def compare_speed(models: Mapping[str, torch.nn.Module], batches: list[dict], threads: int, *,
                  warmup: int = 1, repeats: int = 3) -> dict[str, dict]:
    """Throughput of each model on the same batches and thread count, measured side by side.

    Each model gets `warmup` untimed passes (allocator, kernel selection), then the models take turns:
    repeat r times every model once, starting with a different model each repeat so none is always
    first. Returns {name: {"sequences_per_s", "seconds", "batch_size", "threads"}} where "seconds" is
    the best single pass over all batches and sequences_per_s = total sequences / seconds.
    """
    batch_size = _validate(batches, threads, warmup, repeats)
    if not models:
        raise ValueError("models: expected at least one model, got none")
    names = list(models)
    sequences = sum(int(b["input_ids"].shape[0]) for b in batches)
    placed = {name: [{k: v.to(_device(models[name])) for k, v in b.items()} for b in batches] for name in names}
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(eval_mode(models[name]))
        best = compare_calls({name: partial(_one_pass, models[name], placed[name], _device(models[name]))
                              for name in names}, threads, warmup=warmup, repeats=repeats)
    return {name: {"sequences_per_s": sequences / best[name], "seconds": best[name], "batch_size": batch_size,
                   "threads": threads} for name in names}
