"""Cost of distillation over plain training, measured side by side on the same batches.

    python -m bench.pretrain_step [--batch 16 --length 128 --rounds 5 --threads 0]

Ratios (targets from the issue):
  kd_step / mlm_step                              KD from the cached top-k + MLM vs a plain masked-LM step  (<= 1.15)
  online_step / (teacher_forward + mlm_step)      cached KD + online hidden-state loss vs its two parts     (<= 1.10)
A 3-layer MiniLM-shaped student (hidden 384, 12 heads, vocabulary 30522) and a 6-layer MiniLM-shaped
teacher (random weights: timing does not depend on them). The batch is synthetic text in the real
transfer-set format: the top-k ids/logits and log-sum-exp come from the teacher's forward, collated by
kdlib.cache.collate_rows. Variants run interleaved, one of each per round; the median round is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kdlib.cache import collate_rows
from kdlib.objectives import ObjectiveConfig
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teacher_outputs import rows_from_outputs, teacher_forward
from kdlib.training.inputs import Offer
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule

VOCAB, HIDDEN, HEADS, FFN = 30522, 384, 12, 1536


def bert(layers: int, seed: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, intermediate_size=FFN))


def make_batch(teacher, batch: int, length: int, top_k: int, seed: int) -> dict:
    """Variable-length rows with 15% [MASK] positions and the teacher's top-k, collated like the trainer."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length * 3 // 4, length + 1, size=batch)
    lengths[0] = length
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.from_numpy(rng.integers(1000, VOCAB, size=n))
        mask[i, :n] = 1
    outputs = TeacherOutputsConfig(top_k=top_k)
    rows = rows_from_outputs(teacher_forward(teacher, ids, mask, outputs), ids, mask, outputs, VOCAB)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        positions = np.sort(rng.choice(np.arange(1, n - 1), size=max(1, int(0.15 * n)), replace=False))
        row.update(id=str(i), input_ids=ids[i, :n].numpy().copy(), mlm_positions=positions,
                   mlm_labels=ids[i, positions].numpy().copy())
        row["input_ids"][positions] = 103  # [MASK]
    return collate_rows(rows, top_k=top_k, hidden_size=HIDDEN)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, student = bert(6, 0).eval(), bert(3, 1)
    teacher.requires_grad_(False)
    batch = make_batch(teacher, args.batch, args.length, args.top_k, 0)
    tokens = int(batch["attention_mask"].sum())
    cached = [ObjectiveConfig("kd_topk"), ObjectiveConfig("mlm_ce", weight=0.5)]
    topk = frozenset({"topk_ids", "topk_logits", "teacher_lse", "mlm_labels"})
    kd = DistillModule(student, cached, Offer(online_teacher=False, cached=topk), teacher_width=HIDDEN, seed=0)
    online = DistillModule(student, cached + [ObjectiveConfig("hidden_mse")],
                           Offer(online_teacher=True, cached=topk, pairs=((2, 1), (4, 2), (6, 3))),
                           teacher_width=HIDDEN, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def mlm_step():
        update(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["mlm_labels"]).loss)

    def teacher_step():
        with torch.no_grad():
            return run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=True, qkv=False,
                             heads=HEADS)

    def kd_step():
        update(kd(batch)[0])

    def online_step():
        update(online(batch, teacher_step())[0])

    variants = {"mlm_step": mlm_step, "kd_step": kd_step, "teacher_forward": teacher_step, "online_step": online_step}
    for fn in variants.values():  # warm-up: allocator, kernels, optimizer state
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"batch {args.batch} x {args.length} ({tokens} real tokens), top-k {args.top_k}, "
          f"threads {torch.get_num_threads()}, rounds {args.rounds} (median)")
    for name, seconds in med.items():
        print(f"  {name:16s} {seconds * 1000:9.1f} ms   {tokens / seconds:10,.0f} tokens/s")
    kd_ratio = med["kd_step"] / med["mlm_step"]
    online_ratio = med["online_step"] / (med["teacher_forward"] + med["mlm_step"])
    print(f"kd_step / mlm_step                         = {kd_ratio:.3f}   (target <= 1.15)")
    print(f"online_step / (teacher_forward + mlm_step) = {online_ratio:.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
