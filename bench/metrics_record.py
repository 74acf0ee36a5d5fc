"""What a logged record costs with TensorBoard events beside metrics.jsonl: `python -m bench.metrics_record`.

One MetricsWriter writes only metrics.jsonl, one writes both, side by side in one run, over the same train record
(total loss, three terms, lr, tokens, tokens/s, epoch). Median of several rounds; the first record's one-time cost
(importing tensorboard, opening the events file) is timed apart."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from kdlib.runtime.metrics import MetricsWriter

RECORD = {"kind": "train", "loss": 2.31, "kd_topk": 1.9, "hidden_mse": 0.3, "attention_mse": 0.11, "lr": 1e-4,
          "tokens": 4096, "tokens_per_s": 2300.5, "epoch": 0.25}


def per_record(writer: MetricsWriter, records: int, first_step: int) -> float:
    t0 = time.perf_counter()
    for step in range(first_step, first_step + records):
        writer.write({**RECORD, "step": step})
    return (time.perf_counter() - t0) / records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_record", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="records per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the median counts)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        plain = MetricsWriter(Path(tmp, "plain", "metrics.jsonl"), tensorboard=False)
        both = MetricsWriter(Path(tmp, "both", "metrics.jsonl"), tensorboard=True)
        t0 = time.perf_counter()
        both.write({**RECORD, "step": 0})
        first = time.perf_counter() - t0
        plain.write({**RECORD, "step": 0})
        times = {"jsonl": [], "jsonl+tb": []}
        for r in range(args.rounds):  # interleaved, so machine noise falls on both alike
            start = 1 + r * args.records
            times["jsonl"].append(per_record(plain, args.records, start))
            times["jsonl+tb"].append(per_record(both, args.records, start))
        plain.close()
        both.close()
    a, b = statistics.median(times["jsonl"]), statistics.median(times["jsonl+tb"])
    print(f"metrics.jsonl only:        {a * 1e6:7.1f} us per record")
    print(f"metrics.jsonl + events:    {b * 1e6:7.1f} us per record  ({b / a:.1f}x, +{(b - a) * 1e6:.1f} us)")
    print(f"first record with events:  {first * 1e3:7.1f} ms (tensorboard import, file open)")


if __name__ == "__main__":
    main()
