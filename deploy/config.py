"""The deploy config: which model folder to export, what text to check it on, how to time it.

Checks that need the files themselves (the model folder is loadable, the eval file exists and its labels are
the model's, the lengths fit the model's positions) run in `deploy.run.check_inputs` before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdlib.config import check_positive_ints


@dataclass
class DeployConfig:
    """Export one model folder for CPU serving and measure what ONNX and int8 cost and gain."""

    model: str  # the model folder (config.json + *.safetensors), or package:<module>
    output_dir: str  # where the ONNX files, tokenizer, config.json, deploy.json, deploy.md and deploy.png go
    eval_data: str  # jsonl, one {"text": ..., "label": ...} per line (label optional; the finetune fold files)
    max_length: int = 128  # tokens per eval text (longer ones are truncated)
    batch_size: int = 32  # eval texts per forward pass
    threads: int = 1  # CPU threads, the same for torch (set_num_threads) and onnxruntime (intra-op threads)
    speed_length: int = 128  # tokens per timed sequence (random vocabulary ids, no padding)
    speed_batches: list[int] = field(default_factory=lambda: [1, 32])  # latency at the smallest, throughput largest
    repeats: int = 3  # timed passes per candidate, interleaved across candidates; the fastest counts
    warmup: int = 1  # untimed passes per candidate first
    opset: int = 17  # ONNX opset of the exported graph
    progress_bar: bool = True  # a tqdm bar over the phases (quiet when stderr is not a terminal)
    overwrite: bool = False  # re-measure a deployment of the same config, or replace one of another config

    def __post_init__(self) -> None:
        for name in ("model", "output_dir", "eval_data"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a path, got {value!r}")
        if self.model.startswith("package:") and not self.model[len("package:"):].strip():
            raise ValueError("model: expected package:<module>, got no module name")
        check_positive_ints(self, "max_length", "batch_size", "threads", "speed_length", "repeats")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an integer >= 0, got {self.warmup!r}")
        if not self.speed_batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                         for b in self.speed_batches):
            raise ValueError(f"speed_batches: expected a list of positive batch sizes, got {self.speed_batches!r}")
        if not 9 <= self.opset <= 21:
            raise ValueError(f"opset: expected an ONNX opset from 9 to 21, got {self.opset}")
