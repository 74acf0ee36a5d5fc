"""Pipeline throughput against a bare teacher forward, cache size, and top-k fidelity, in one run.

    python -m bench.pipeline_throughput [--config configs/demo_pipeline.yaml] [--max-documents N]

1. Runs the real pipeline (DirectRunner, 2 worker processes) into bench/out/, timing it end to end.
2. Reads back exactly the sequences it cached and runs the bare teacher forward over them in one
   process with the same batch size and all cores (inference mode), timing it.
3. Prints pipeline tokens/s / bare tokens/s, cache bytes per cached position (and divided by dense
   fp16 logits), and kept mass / KL(full || top-k reconstruction) for several k on the same positions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdlib.cache import TransferSet
from kdlib.runtime.models import ModelConfig, load_model
from kdlib.teachers.outputs import topk_fidelity

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "pipeline_transfer_set"


def run_pipeline(config: str, max_documents: int | None) -> float:
    if OUT.exists():
        shutil.rmtree(OUT)
    cmd = [sys.executable, "-m", "data_pipeline", "--config", config, "--set", f"output_dir={OUT}",
           "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    if max_documents:
        cmd += ["--set", f"corpus.max_documents={max_documents}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def bare_forward(ts: TransferSet, teacher: ModelConfig, batch_size: int, sample_positions: int):
    """The same sequences, same batch size, grouped by length as the pipeline does; returns seconds,
    tokens, and full logits at sampled positions for the fidelity sweep."""
    torch.set_num_threads(2)
    model = load_model(teacher)
    rows = sorted((ts.row(i) for i in range(len(ts))), key=lambda r: len(r["input_ids"]))
    rng = np.random.default_rng(0)
    sampled, tokens, seconds = [], 0, 0.0
    per_batch = max(1, sample_positions // max(1, len(rows) // batch_size))
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r["input_ids"])] = torch.as_tensor(np.asarray(r["input_ids"], dtype=np.int64))
            mask[i, :len(r["input_ids"])] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        seconds += time.perf_counter() - t0
        tokens += int(mask.sum())
        real = mask.flatten().nonzero().squeeze(-1).numpy()
        pick = torch.as_tensor(rng.choice(real, size=min(per_batch, len(real)), replace=False))
        sampled.append(logits.reshape(-1, logits.shape[-1])[pick].clone())
    return seconds, tokens, torch.cat(sampled)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_pipeline.yaml")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--sample-positions", type=int, default=4096)
    args = parser.parse_args()

    wall = run_pipeline(args.config, args.max_documents)
    ts = TransferSet(OUT)
    m = ts.manifest
    cfg = m.config
    teacher = ModelConfig(path=cfg["teacher"]["path"], task=cfg["teacher"]["task"])
    bare_s, bare_tokens, sampled = bare_forward(ts, teacher, cfg["batch_size"], args.sample_positions)
    tokens = m.totals["tokens"]
    assert bare_tokens == tokens, (bare_tokens, tokens)
    pipe_tps, bare_tps = tokens / wall, tokens / bare_s
    k = m.cached["top_k"]
    vocab = m.teacher["vocab_size"]
    bytes_per_pos = m.totals["bytes"] / tokens
    dense_fp16 = vocab * 2
    print("\n== pipeline throughput (same sequences, same batch size, one run)")
    print(f"rows {m.totals['rows']}, tokens {tokens:,}, shards {len(m.shards)}")
    print(f"pipeline end to end   {wall:8.1f} s  {pipe_tps:10,.0f} tokens/s  (2 DirectRunner workers, start-up included)")
    print(f"bare teacher forward  {bare_s:8.1f} s  {bare_tps:10,.0f} tokens/s  (1 process, 2 threads, inference mode)")
    print(f"ratio pipeline / bare forward: {pipe_tps / bare_tps:.2f}  (target >= 0.8)")
    print("\n== cache size")
    print(f"{bytes_per_pos:.1f} bytes per cached position (top-{k} ids {m.cached['topk_id_dtype']} + fp16 logits + fp32 lse "
          f"+ ids/labels, zstd); dense fp16 logits would be {dense_fp16:,} bytes: ratio {bytes_per_pos / dense_fp16:.5f}")
    print(f"manifest fidelity at k={k}: kept mass {m.fidelity['mean_kept_mass']:.4f}, KL {m.fidelity['mean_kl']:.5f} "
          f"over {m.fidelity['positions']} positions")
    print("\n== top-k fidelity sweep on the same teacher (sampled positions, fp16-stored logits)")
    print(f"{'k':>5} {'kept mass':>10} {'KL(full||topk)':>15}")
    sweep = {}
    for kk in (8, 16, 32, 64, 128, 256):
        kept, kl = topk_fidelity(sampled, kk)
        sweep[kk] = (float(kept.mean()), float(kl.mean()))
        print(f"{kk:>5} {sweep[kk][0]:>10.4f} {sweep[kk][1]:>15.5f}")
    (ROOT / "bench" / "out" / "pipeline_throughput.json").write_text(json.dumps({
        "tokens": tokens, "pipeline_seconds": wall, "bare_seconds": bare_s, "ratio": pipe_tps / bare_tps,
        "bytes_per_position": bytes_per_pos, "dense_fp16_bytes": dense_fp16, "fidelity": m.fidelity,
        "sweep": sweep}, indent=1))


if __name__ == "__main__":
    main()
