"""What the output layer of a KD step costs, chunked vs unchunked, at two vocabulary sizes.

`python -m bench.kd_chunked [--vocab 30522,128000] [--positions 2048] [--hidden 384] [--rounds 3]`
times, side by side on the same tensors, the output projection + loss + backward of:
  * plain: masked-LM cross-entropy at 15% of the positions, unchunked (what a plain student step pays);
  * kd: `kd_topk` (rest bucket, top-32) at every position on full (N, V) logits;
  * kd chunked: `kdlib.losses.chunked.chunked_kd_topk` (chunks of 256 and 1024 positions);
and measures each one's peak memory in a fresh process (growth of the resident set over the step,
with glibc told to return large blocks, so the peak follows live tensors). Loss level only: the
training path does not use the chunked functions yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kdlib.losses.chunked_twins import chunked_kd_topk
from kdlib.losses.output import mlm_ce
from kdlib.losses.topk import kd_topk

TOPK = 32


def inputs(vocab: int, positions: int, hidden: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(positions, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    b = torch.zeros(vocab)
    teacher = torch.randn(positions, TOPK, generator=g) * 2
    ids = torch.stack([torch.randperm(vocab, generator=g)[:TOPK].clone() for _ in range(positions)])  # clone: free each permutation
    lse = torch.logsumexp(teacher, -1) + 0.5  # a teacher with ~61% of its mass in its top 32
    labels = torch.full((positions,), -100, dtype=torch.long)
    picked = torch.randperm(positions, generator=g)[: int(0.15 * positions)]
    labels[picked] = torch.randint(0, vocab, (len(picked),), generator=g)
    return {"h": h, "w": w, "b": b, "ids": ids, "z": teacher, "lse": lse, "labels": labels}


def step(variant: str, x: dict) -> None:
    """Forward + backward of one variant's output layer; gradients land in h, w, b."""
    h, w, b = (x[k].detach().requires_grad_(True) for k in ("h", "w", "b"))
    if variant == "plain":
        loss = mlm_ce(torch.nn.functional.linear(h, w, b).unsqueeze(0), x["labels"].unsqueeze(0), None)
    elif variant == "kd":
        loss = kd_topk(torch.nn.functional.linear(h, w, b).unsqueeze(0), x["ids"].unsqueeze(0), x["z"].unsqueeze(0),
                       x["lse"].unsqueeze(0), None, missing_mass="rest_bucket")
    else:
        chunk = int(variant.removeprefix("chunked"))
        loss = chunked_kd_topk(h, w, b, x["ids"], x["z"], x["lse"], missing_mass="rest_bucket", chunk_size=chunk)
    loss.backward()


def peak_in_fresh_process(variant: str, vocab: int, positions: int, hidden: int) -> float:
    """MiB the resident set grows by over one step (after a warm-up step), in its own process."""
    code = ("import torch, json; from bench.kd_chunked import inputs, step; "
            "from kdlib.runtime.speed import resident_peak_kib; "
            f"x = inputs({vocab}, {positions}, {hidden}); torch.set_num_threads(2); "
            f"step('{variant}', inputs(64, 4, {hidden})); "
            "before = resident_peak_kib(); "
            f"step('{variant}', x); "
            "print(json.dumps((resident_peak_kib() - before) / 1024))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"  # a tiny step may not raise the resident set's high-water mark


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kd_chunked", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="30522,128000")
    parser.add_argument("--positions", type=int, default=2048)  # 16 x 128, every position real
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    variants = ["plain", "kd", "chunked256", "chunked1024"]
    vocabs = [int(v) for v in args.vocab.split(",")]
    peaks = {vocab: {v: peak_in_fresh_process(v, vocab, args.positions, args.hidden) for v in variants}
             for vocab in vocabs}
    results = {}
    for vocab in vocabs:
        x = inputs(vocab, args.positions, args.hidden)
        for v in variants:  # warm-up
            step(v, x)
        times = {v: [] for v in variants}
        for _ in range(args.rounds):  # interleaved: machine noise hits every variant alike
            for v in variants:
                t0 = time.perf_counter()
                step(v, x)
                times[v].append(time.perf_counter() - t0)
        results[vocab] = {v: {"ms": 1000 * statistics.median(times[v]), "peak_mib": peaks[vocab][v]} for v in variants}
    print(f"{args.positions} positions x hidden {args.hidden}, top-{TOPK} rest-bucket KD, float32, 2 threads, "
          f"median of {args.rounds} interleaved rounds; peak = resident-set growth over one step in a fresh process\n")
    print("| vocabulary | variant | ms | peak MiB | ms / plain | ms / kd | peak / plain | peak / kd |")
    print("|---|---|---|---|---|---|---|---|")
    for vocab, row in results.items():
        for v, r in row.items():
            print(f"| {vocab:,} | {v} | {r['ms']:.1f} | {r['peak_mib']:.0f} | {ratio(r['ms'], row['plain']['ms'])} | "
                  f"{ratio(r['ms'], row['kd']['ms'])} | {ratio(r['peak_mib'], row['plain']['peak_mib'])} | "
                  f"{ratio(r['peak_mib'], row['kd']['peak_mib'])} |")
    print("\n" + json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
