"""Run the deployed files and compare them with the torch model: outputs, agreement, and speed side by side.

Speed goes through `kdlib.runtime.speed.compare_calls`, the same interleaved best-of-repeats scheduler that
`compare_speed` uses for torch modules, so a torch model and an onnxruntime session are timed on the same
batches, in turns, with the same thread count (torch.set_num_threads for torch; intra_op_num_threads for
onnxruntime, whose inter-op pool is 1 and execution sequential so that it uses no more threads than torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnxruntime as ort
import torch

from kdlib.deploy.onnx_export import output_name
from kdlib.runtime.speed import eval_mode, compare_calls


def as_numpy(values) -> np.ndarray:
    """int64 numpy array from a torch tensor, numpy array or nested list."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64))


class OnnxRunner:
    """An onnxruntime CPU session over one exported file: `runner(input_ids, attention_mask)` -> the one output."""

    def __init__(self, path: str | os.PathLike, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.path, self.threads = Path(path), threads
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name

    def __call__(self, input_ids, attention_mask) -> np.ndarray:
        feeds = {"input_ids": as_numpy(input_ids), "attention_mask": as_numpy(attention_mask)}
        return self.session.run([self.output], feeds)[0]


def torch_call(model: torch.nn.Module, output: str) -> Callable:
    """`fn(input_ids, attention_mask)` -> the model's `output` tensor as numpy, in inference mode (the caller
    puts the model in eval mode: kdlib.runtime.models.load_model already does)."""

    # a decoder would also build its key/value cache, which the exported graph does not: not timed for it either
    extra = {"use_cache": False} if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) else {}

    def call(input_ids, attention_mask) -> np.ndarray:
        with torch.inference_mode():
            ids = torch.as_tensor(as_numpy(input_ids))
            mask = torch.as_tensor(as_numpy(attention_mask))
            return model(input_ids=ids, attention_mask=mask, return_dict=True, **extra)[output].float().numpy()

    return call


def max_abs_difference(model: torch.nn.Module, runner: Callable, batches: list[dict]) -> float:
    """max |runner - model| over every value of every batch (float64), the model in eval + inference mode."""
    reference = torch_call(model, output_name(model))
    worst = 0.0
    with eval_mode(model):
        for batch in batches:
            ref = reference(batch["input_ids"], batch["attention_mask"])
            worst = max(worst, row_max_abs(ref, np.asarray(runner(batch["input_ids"], batch["attention_mask"]))))
    return worst


def compare_deployed(candidates: Mapping[str, Callable], batches: list[dict], threads: int, repeats: int = 3,
                     warmup: int = 1) -> dict[str, dict]:
    """Seconds (best pass over all batches), sequences/s and seconds per batch of each `fn(input_ids,
    attention_mask)`, timed in turns on the same batches with torch's thread count set to `threads`.

    An OnnxRunner candidate must have been built with the same `threads` (checked), so both runtimes use
    the same number of cores.
    """
    for name, fn in candidates.items():
        if isinstance(fn, OnnxRunner) and fn.threads != threads:
            raise ValueError(f"candidates.{name}: its onnxruntime session has {fn.threads} threads, not {threads}")
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    feeds = [(as_numpy(b["input_ids"]), as_numpy(b["attention_mask"])) for b in batches]
    torch_feeds = [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in feeds]

    def one_pass(fn):
        chosen = feeds if isinstance(fn, OnnxRunner) else torch_feeds
        return lambda: [fn(ids, mask) for ids, mask in chosen]

    best = compare_calls({name: one_pass(fn) for name, fn in candidates.items()}, threads, warmup=warmup,
                         repeats=repeats)
    sequences = sum(int(ids.shape[0]) for ids, _ in feeds)
    return {name: {"seconds": best[name], "sequences_per_s": sequences / best[name],
                   "seconds_per_batch": best[name] / len(feeds), "batch_size": int(feeds[0][0].shape[0]),
                   "length": int(feeds[0][0].shape[1]), "batches": len(feeds), "threads": threads}
            for name in candidates}


def row_max_abs(ref: np.ndarray, got: np.ndarray) -> float:
    """max |got - ref| in float64, one sequence at a time (a masked LM's logits are large)."""
    if got.shape != ref.shape:
        raise ValueError(f"runner: output shape {got.shape} differs from the model's {ref.shape}")
    if not ref.size:
        return 0.0
    return max(float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)))) for r, g in zip(ref, got))
