"""Inference speed of a task-distilled student against its teacher, side by side in one run.

    python -m bench.finetune_speed [--run runs/demo/finetune --fold 0 --seed 0 --batches 1,8,32 --threads 1,2]

Loads a fold's fine-tuned teacher and its KD student (the exports of `python -m finetune`), then for each
batch size and thread count times both on the same held-out sentences (kdlib.runtime.speed.compare_speed: a
warm-up pass each, then passes interleaved with a rotating order, best of --repeats) and prints
sequences/s of each and the student's speed-up. Performance is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune.data import EncodedExamples
from finetune.folds import read_split
from finetune.models import load_classifier
from kdlib.runtime.models import load_tokenizer
from kdlib.runtime.speed import compare_speed, count_parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/finetune")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run = Path(args.run)
    labels = json.loads((run / "folds/labels.json").read_text())
    folders = {"teacher": run / f"fold-{args.fold}/teacher/export", "kd": run / f"fold-{args.fold}/seed-{args.seed}/kd/export"}
    models = {name: load_classifier(str(folder), labels, seed=0, new_head=False) for name, folder in folders.items()}
    tokenizer = load_tokenizer(str(folders["teacher"]))
    examples = EncodedExamples(read_split(run / f"folds/fold-{args.fold}/test.jsonl"), tokenizer, labels, 128)
    print(f"held-out sentences: {len(examples)}; parameters: teacher {count_parameters(models['teacher']):,}, "
          f"student {count_parameters(models['kd']):,}")
    print("| batch | threads | teacher seq/s | student seq/s | speed-up |\n|---|---|---|---|---|")
    for size in [int(b) for b in args.batches.split(",")]:
        batches = [{k: v for k, v in examples.batch(list(range(i, min(i + size, len(examples))))).items()
                    if k in ("input_ids", "attention_mask")} for i in range(0, len(examples), size)]
        for threads in [int(t) for t in args.threads.split(",")]:
            speed = compare_speed(models, batches, threads, repeats=args.repeats)
            t, s = speed["teacher"]["sequences_per_s"], speed["kd"]["sequences_per_s"]
            print(f"| {size} | {threads} | {t:,.1f} | {s:,.1f} | {s / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
