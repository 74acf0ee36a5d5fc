"""This rank's micro-batches, step by step, decoded and collated ahead on a background thread.

The sampler is the one source of order. The producer thread walks a copy of it ahead of the trainer
through a bounded queue; the trainer's own sampler advances only as steps are consumed, so its
state_dict is exactly the position of the next step to train (a checkpoint never counts prefetched
batches as seen) and a resumed run sees the batches the uninterrupted one would have. Decoding in
Parquet/numpy/torch releases the GIL for most of its time, so the training thread keeps computing.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Callable

import torch



def _pinned(batch: dict) -> dict:
    """Page-locked host tensors, so the copy to the GPU can overlap compute (non_blocking)."""
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


class BatchStream:
    """next_step() -> this rank's micro-batches (CPU tensors, each with `num_tokens`) for the next step."""

    def __init__(self, sampler, load: Callable[[list[int]], dict], *, depth: int = 2, pin_memory: bool = False):
        self.sampler, self.load, self.depth, self.pin = sampler, load, depth, pin_memory
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _make(self, indices: list[int]) -> dict:
        batch = self.load(indices)
        batch["num_tokens"] = int(batch["attention_mask"].sum())  # counted on the host: no device sync later
        return _pinned(batch) if self.pin else batch

    def _produce(self, ahead) -> None:
        try:
            while not self._stop.is_set():
                step = ahead.next_step()
                item = (step, [self._make(indices) for indices in step])
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the training thread, which re-raises it
            self._queue.put(err)

    def start(self) -> "BatchStream":
        """Start prefetching from the sampler's current state (call after a resume has restored it)."""
        if self.depth > 0:
            self._queue = queue.Queue(maxsize=self.depth)
            ahead = copy.deepcopy(self.sampler)
            self._thread = threading.Thread(target=self._produce, args=(ahead,), name="batch-prefetch", daemon=True)
            self._thread.start()
        return self

    def next_step(self) -> list[dict]:
        step = self.sampler.next_step()
        if self._queue is None:
            return [self._make(indices) for indices in step]
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        ahead_step, batches = item
        if ahead_step != step:  # an internal invariant: the copy and the sampler walk the same order
            raise RuntimeError(f"prefetch out of order: expected {step}, got {ahead_step}")
        return batches

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
