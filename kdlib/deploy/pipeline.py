"""A model folder in, a self-contained deployment folder out: ONNX fp32 + int8, tokenizer, config, deploy.json.

The four candidates are measured on the same inputs: quality on the caller's texts (each compared with the
transformers fp32 model, the reference), size on disk, and speed side by side (kdlib.deploy.measure) on
random token ids at exactly `speed_length` tokens, so every candidate and every batch costs the same.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnxruntime
import torch

from kdlib.deploy.measure import OnnxRunner, compare_deployed, row_max_abs, torch_call
from kdlib.deploy.onnx_export import ExportError, export_onnx, output_name
from kdlib.deploy.quantize import quantize_int8, torch_dynamic_int8
from kdlib.runtime.io import atomic_write_bytes, atomic_write_text, json_safe
from kdlib.runtime.models import (HEADS, ModelConfig, architectures_of, check_model_folder, copy_tokenizer_files,
                                  head_of, load_model, load_tokenizer, task_of)
from kdlib.runtime.speed import torch_threads

CANDIDATES = ("transformers fp32", "torch dynamic int8", "onnxruntime fp32", "onnxruntime int8")
REFERENCE = CANDIDATES[0]
FILES = {"onnxruntime fp32": "model.onnx", "onnxruntime int8": "model.int8.onnx"}
QUALITY = {"sequence_classification": "prediction agreement with transformers fp32",
           "masked_lm": "top-1 token agreement with transformers fp32 at real (attention_mask 1) positions",
           "causal_lm": "top-1 token agreement with transformers fp32 at real (attention_mask 1) positions",
           "base": "mean cosine of last hidden states with transformers fp32 at real (attention_mask 1) positions"}
SPEED_INPUTS = "random non-special token ids of the vocabulary (seed 0), attention_mask all 1: no padding"
TORCH_INT8_SIZE = ("bytes of its state_dict serialised with torch.save into memory (measured only, never "
                   "written or loaded)")


def load_folder(folder: Path):
    """(model in eval mode, tokenizer, task) of a model folder, offline, safetensors only (kdlib.runtime.models)."""
    config = check_model_folder(Path(folder))
    unknown = [name for name in architectures_of(config) if head_of(name) is None]
    if unknown:  # loaded as "base", its head would be silently dropped from the export
        raise ExportError(f"{Path(folder) / 'config.json'}: architectures {', '.join(map(str, unknown))}: cannot "
                          f"export this head; expected a bare model or a head ending in "
                          f"{', '.join(suffix for suffix, _ in HEADS)}")
    task = task_of(config)
    model = load_model(ModelConfig(path=str(folder), task=task))
    return model, load_tokenizer(str(folder), config), task


def quality_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict]:
    """The texts tokenized in order, `batch_size` at a time, padded to the longest of each batch (int64)."""
    if tokenizer.pad_token is None:  # decoders often have none; padded positions are masked and not scored
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt", return_token_type_ids=False)
        batches.append({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()})
    return batches


def timing_batches(tokenizer, length: int, batch_size: int, count: int, seed: int = 0) -> list[dict]:
    """`count` batches of `batch_size` x `length` random non-special token ids, no padding (see SPEED_INPUTS)."""
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(seed)
    return [{"input_ids": torch.from_numpy(rng.choice(vocab, (batch_size, length))),
             "attention_mask": torch.ones((batch_size, length), dtype=torch.long)} for _ in range(count)]


def _score(task: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(sum of the quality score, number of items) of one batch: agreement counts or cosine sums."""
    if task == "sequence_classification":
        return float(np.sum(ref.argmax(-1) == got.argmax(-1))), len(ref)
    real = mask.astype(bool)
    if task in ("masked_lm", "causal_lm"):
        return float(np.sum(ref.argmax(-1)[real] == got.argmax(-1)[real])), int(real.sum())
    a, b = ref[real].astype(np.float64), got[real].astype(np.float64)
    cos = np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return float(cos.sum()), int(real.sum())


def measure_quality(task: str, calls: dict[str, Callable], batches: list[dict],
                    labels: Optional[list[int]]) -> dict[str, dict]:
    """Per candidate: agreement (QUALITY[task]) and max |Δ| with the reference, accuracy against `labels`
    (classifiers), and the outputs' argmax per text (classifiers), all on the same batches."""
    totals = {name: [0.0, 0, 0.0, 0] for name in calls}  # score sum, items, max |Δ|, correct labels
    logits = {name: [] for name in calls}
    row = 0
    for batch in batches:
        mask = batch["attention_mask"].numpy()
        outs = {name: np.asarray(fn(batch["input_ids"], batch["attention_mask"])) for name, fn in calls.items()}
        ref = outs[REFERENCE]
        for name, got in outs.items():
            score, items = _score(task, ref, got, mask)
            t = totals[name]
            t[0] += score
            t[1] += items
            t[2] = max(t[2], row_max_abs(ref, got))
            if task == "sequence_classification":
                logits[name].extend(got.astype(np.float64).tolist())
                if labels is not None:
                    t[3] += int(np.sum(got.argmax(-1) == np.asarray(labels[row:row + len(got)])))
        row += len(ref)
    return {name: {"agreement": t[0] / t[1] if t[1] else math.nan, "max_abs_diff": t[2],
                   "accuracy": t[3] / row if labels is not None and task == "sequence_classification" and row
                   else None, "logits": logits[name] or None} for name, t in totals.items()}


def _sizes(folder: Path, out: Path, torch_int8: torch.nn.Module) -> dict[str, int]:
    buffer = io.BytesIO()
    torch.save(torch_int8.state_dict(), buffer)
    return {"transformers fp32": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "torch dynamic int8": buffer.getbuffer().nbytes,
            **{name: (out / file).stat().st_size for name, file in FILES.items()}}


def deploy_model(folder: Path, out: Path, *, texts: list[str], labels: Optional[list[int]] = None,
                 max_length: int = 128, threads: int = 1, speed_length: int = 128, speed_batches: tuple = (1, 32),
                 repeats: int = 3, warmup: int = 1, batch_size: int = 32, opset: int = 17,
                 progress: Optional[Callable[[str], None]] = None, extra: Optional[dict] = None) -> dict:
    """Export `folder`'s model to `out` (model.onnx, model.int8.onnx, config.json, tokenizer files), measure the
    four CANDIDATES and write the record as out/deploy.json (atomically); returns the record.

    Latency is seconds per batch at the smallest of `speed_batches`, throughput sequences/s at the largest;
    each size runs max(1, largest // size) batches per timed pass. `progress(phase)` is told each phase;
    `extra` entries are added to the record (a stage's claim and config).
    """
    say = progress or (lambda phase: None)
    start = time.perf_counter()
    folder, out = Path(folder), Path(out)
    sizes = sorted({int(b) for b in speed_batches})
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"labels: expected one per text ({len(texts)}), got {len(labels)}")
    if not sizes or sizes[0] < 1:
        raise ValueError(f"speed_batches: expected positive batch sizes, got {speed_batches!r}")
    say("loading")
    model, tokenizer, task = load_folder(folder)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if isinstance(limit, int) and speed_length > limit:
        raise ValueError(f"speed_length: expected at most {limit} (the model's positions), got {speed_length}")
    name = output_name(model)
    out.mkdir(parents=True, exist_ok=True)
    say("exporting ONNX")
    export_onnx(model, out / FILES["onnxruntime fp32"], opset=opset)
    say("quantizing to int8")
    quantize_int8(out / FILES["onnxruntime fp32"], out / FILES["onnxruntime int8"])
    atomic_write_bytes(out / "config.json", (folder / "config.json").read_bytes())
    copy_tokenizer_files(folder, out)
    torch_int8 = torch_dynamic_int8(model)
    calls = {REFERENCE: torch_call(model, name), "torch dynamic int8": torch_call(torch_int8, name),
             **{cand: OnnxRunner(out / file, threads) for cand, file in FILES.items()}}
    with torch_threads(threads):
        say("measuring quality")
        quality = measure_quality(task, calls, quality_batches(tokenizer, texts, max_length, batch_size), labels)
        speed = {}
        for size in sizes:
            say(f"timing batch {size} x {speed_length}")
            batches = timing_batches(tokenizer, speed_length, size, max(1, sizes[-1] // size))
            speed[str(size)] = compare_deployed(calls, batches, threads, repeats=repeats, warmup=warmup)
    on_disk = _sizes(folder, out, torch_int8)
    small, large = str(sizes[0]), str(sizes[-1])
    base = speed[large][REFERENCE]["sequences_per_s"]
    candidates = {cand: {"size_bytes": on_disk[cand], "file": FILES.get(cand),
                         "latency_s": speed[small][cand]["seconds_per_batch"],
                         "throughput_seq_per_s": speed[large][cand]["sequences_per_s"],
                         "speedup": speed[large][cand]["sequences_per_s"] / base,
                         "max_abs_diff": quality[cand]["max_abs_diff"], "agreement": quality[cand]["agreement"],
                         "accuracy": quality[cand]["accuracy"]} for cand in CANDIDATES}
    label_names = None
    if task == "sequence_classification":
        id2label = model.config.id2label
        label_names = [id2label[i] for i in range(len(id2label))]
    record = {"stage": "deploy", "model": str(folder), "architecture": type(model).__name__, "task": task,
              "output": name, "inputs": ["input_ids", "attention_mask"], "threads": threads,
              "speed_length": speed_length, "speed_batches": sizes, "latency_batch": sizes[0],
              "throughput_batch": sizes[-1], "repeats": repeats, "warmup": warmup, "speed_inputs": SPEED_INPUTS,
              "texts": len(texts), "max_length": max_length, "labels": labels is not None,
              "quality_metric": QUALITY[task], "sizes": {"torch dynamic int8": TORCH_INT8_SIZE},
              "candidates": candidates,
              "max_abs_diff": {cand: quality[cand]["max_abs_diff"] for cand in FILES},
              "speed": speed, "label_names": label_names,
              "predictions": quality["onnxruntime int8"]["logits"],
              "onnx": {"opset": opset, "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                       "quantization": "onnxruntime quantize_dynamic: MatMul/Gemm weights QInt8 per output channel, "
                                       "activations uint8 per batch; embeddings fp32"},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "versions": _versions(), "wall_seconds": time.perf_counter() - start, **(extra or {})}
    atomic_write_text(out / "deploy.json", json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n")
    return record


def _versions() -> dict:
    import transformers  # loaded by then (load_folder); importing it at the top would cost kdlib.deploy ~1 s

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}
