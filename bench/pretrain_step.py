"""Cost of distillation over plain training, measured side by side on the same batches, at two vocabularies.

    python -m bench.pretrain_step [--vocab 30522,128000] [--batch 16 --length 128 --rounds 3 --threads 0]
                                  [--no-memory]

Per vocabulary, the variants run interleaved, one of each per round, and the median round is reported:
  mlm_step         a plain masked-LM student step (transformers' own loss on full logits)
  kd_dense         KD from the cached top-k (`kd_topk` rest bucket) + `mlm_ce`, dense logits (chunked_logits: off)
  kd_chunked       the same with the output layer chunked (chunked_logits: auto, the default)
  teacher_forward  the frozen teacher's plain forward pass (hidden states kept, logits computed)
  online_step      kd_chunked + an online hidden-state loss on the teacher's forward as pretrain runs it:
                   no objective reads the teacher's logits, so its output projection is skipped
Ratios (targets from the KD-cost issue): kd / mlm <= 1.10; online_step / (teacher_forward + mlm_step) <= 1.05.
Peak memory: how far the resident set's peak during one step of each variant exceeds the resident set
before it, each in a fresh process, after a warm-up step on a small batch (optimizer state, kernels)
and with the high-water mark reset, glibc told to return large blocks, so the figure follows the
step's live tensors (activations, logits, gradients); target kd <= 1.2x mlm.
A 3-layer MiniLM-shaped student (hidden 384, 12 heads) and a 6-layer teacher of the same width (random
weights: timing does not depend on them); the batch is synthetic text in the real transfer-set format
(top-32 ids/logits and log-sum-exp from the teacher's forward, collated by kdlib.cache.collate_rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from kdlib.cache import collate_rows
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
from kdlib.training.providers import Offer
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule

HIDDEN, HEADS, FFN, CHUNK = 384, 12, 1536, 256
VARIANTS = ("mlm_step", "kd_dense", "kd_chunked", "teacher_forward", "online_step")


def bert(layers: int, seed: int, vocab: int):
    # transformers' model classes: ~4 s to import; --help and bench.causal_step (which imports helpers from here)
    # run without them
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, intermediate_size=FFN))


def random_padded_ids(rng: np.random.Generator, vocab: int, batch: int, length: int):
    """(ids, attention mask, lengths): random ids >= 1000 in right-padded rows of 3/4 to all of `length`
    tokens, the first row full (so the batch is `length` long)."""
    lengths = rng.integers(length * 3 // 4, length + 1, size=batch)
    lengths[0] = length
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.from_numpy(rng.integers(1000, vocab, size=n))
        mask[i, :n] = 1
    return ids, mask, lengths


def make_batch(teacher, vocab: int, batch: int, length: int, top_k: int, seed: int) -> dict:
    """Variable-length rows with 15% [MASK] positions and the teacher's top-k, collated like the trainer."""
    rng = np.random.default_rng(seed)
    ids, mask, lengths = random_padded_ids(rng, vocab, batch, length)
    outputs = TeacherOutputsConfig(top_k=top_k)
    rows = rows_from_outputs(teacher_forward(teacher, ids, mask, outputs), ids, mask, outputs, vocab)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        positions = np.sort(rng.choice(np.arange(1, n - 1), size=max(1, int(0.15 * n)), replace=False))
        row.update(id=str(i), input_ids=ids[i, :n].numpy().copy(), mlm_positions=positions,
                   mlm_labels=ids[i, positions].numpy().copy())
        row["input_ids"][positions] = 103  # [MASK]
    return collate_rows(rows, top_k=top_k, hidden_size=HIDDEN)


def adamw_update(parameters, lr: float = 1e-5):
    """loss -> None: zero the gradients, backward, one AdamW step (the optimizer step every variant pays)."""
    opt = torch.optim.AdamW(parameters, lr=lr)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return update


def setup(vocab: int, batch_size: int, length: int, top_k: int) -> tuple[dict, dict, dict]:
    """(variant name -> one step on the batch, the batch, the same steps on a 2 x 16 batch) on one student,
    teacher and optimizer: the small batch warms up optimizer state and kernels without reaching the
    big batch's activation peak, so a memory measurement after it sees the step's own peak."""
    teacher, student = bert(6, 0, vocab).eval(), bert(3, 1, vocab)
    teacher.requires_grad_(False)
    cached = [ObjectiveConfig("kd_topk", params={"missing_mass": "rest_bucket"}), ObjectiveConfig("mlm_ce", weight=0.5)]
    topk = frozenset({"topk_ids", "topk_logits", "teacher_lse", "mlm_labels"})
    offer = Offer(online_teacher=False, cached=topk)
    kd = {chunk: DistillModule(student, cached, offer, teacher_width=HIDDEN, seed=0, logit_chunk_size=chunk)
          for chunk in (0, CHUNK)}
    online = DistillModule(student, cached + [ObjectiveConfig("hidden_mse")],
                           Offer(online_teacher=True, cached=topk, pairs=((2, 1), (4, 2), (6, 3))),
                           teacher_width=HIDDEN, seed=0, logit_chunk_size=CHUNK)
    update = adamw_update(student.parameters())

    def steps_on(batch: dict) -> dict:
        def teacher_step(logits: bool = True):
            with torch.no_grad():
                return run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=True, qkv=False,
                                 heads=HEADS, logits=logits)

        return {
            "mlm_step": lambda: update(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               labels=batch["mlm_labels"]).loss),
            "kd_dense": lambda: update(kd[0](batch)[0]),
            "kd_chunked": lambda: update(kd[CHUNK](batch)[0]),
            "teacher_forward": teacher_step,
            "online_step": lambda: update(online(batch, teacher_step(online.teacher_reads_logits()))[0]),
        }

    batch = make_batch(teacher, vocab, batch_size, length, top_k, 0)
    return steps_on(batch), batch, steps_on(make_batch(teacher, vocab, 2, 16, top_k, 1))


def fresh_process_peak_mib(setup_code: str, variant: str, cuda: bool = False) -> float:
    """MiB one step's peak memory exceeds the memory before it, in its own process. `setup_code` (Python run
    there first) binds `steps` and `small`: variant name -> one step on the measured / a small batch. The small
    step warms up optimizer state and kernels, then the high-water mark is reset. CPU: the resident set
    (kdlib.runtime.speed), glibc told to return large blocks; cuda: torch's allocated device memory."""
    if cuda:
        step = (f"small['{variant}'](); torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); "
                f"before = torch.cuda.memory_allocated(); steps['{variant}'](); torch.cuda.synchronize(); "
                "print(json.dumps((torch.cuda.max_memory_allocated() - before) / 2 ** 20))")
    else:
        step = ("from kdlib.runtime.speed import reset_resident_peak, resident_kib, resident_peak_kib; "
                f"small['{variant}'](); reset_resident_peak(); before = resident_kib(); steps['{variant}'](); "
                "print(json.dumps((resident_peak_kib() - before) / 1024))")
    code = f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); {setup_code}; {step}"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_in_fresh_process(variant: str, vocab: int, args) -> float:
    """MiB the step's peak resident set exceeds the resident set before it (after a warm-up step on a small
    batch, with the high-water mark reset), in its own process."""
    setup_code = ("from bench.pretrain_step import setup; "
                  f"steps, _, small = setup({vocab}, {args.batch}, {args.length}, {args.top_k})")
    return fresh_process_peak_mib(setup_code, variant)


def median_ms_interleaved(steps: dict, rounds: int, sync=lambda: None) -> dict:
    """Median milliseconds per variant: one warm-up step each (allocator, kernels, optimizer state), then
    `rounds` rounds of one step of each variant in turn, so a slow moment of the machine falls on all of them.
    `sync` waits for queued device work (torch.cuda.synchronize on a GPU)."""
    for fn in steps.values():
        fn()
    sync()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(v) * 1000 for n, v in times.items()}


def measure(vocab: int, args) -> dict:
    steps, batch, _ = setup(vocab, args.batch, args.length, args.top_k)
    return {"tokens": int(batch["attention_mask"].sum()), "ms": median_ms_interleaved(steps, args.rounds)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain_step", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="30522,128000")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x {args.length}, top-k {args.top_k}, chunk {CHUNK}, threads {torch.get_num_threads()}, "
          f"rounds {args.rounds} (median)")
    print("| vocabulary | step | ms | tokens/s | ms / mlm_step | peak MiB | peak / mlm_step |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        result = measure(vocab, args)
        ms, tokens = result["ms"], result["tokens"]
        peaks = {} if args.no_memory else {v: peak_in_fresh_process(v, vocab, args) for v in VARIANTS}
        for name in VARIANTS:
            peak = f"{peaks[name]:,.0f} | {peaks[name] / peaks['mlm_step']:.2f}" if peaks else "- | -"
            print(f"| {vocab:,} | {name} | {ms[name]:,.1f} | {tokens / ms[name] * 1000:,.0f} | "
                  f"{ms[name] / ms['mlm_step']:.3f} | {peak} |")
        summary.append((vocab, ms["kd_dense"] / ms["mlm_step"], ms["kd_chunked"] / ms["mlm_step"],
                        ms["online_step"] / (ms["teacher_forward"] + ms["mlm_step"])))
    print()
    for vocab, dense, chunked, online in summary:
        print(f"vocabulary {vocab:,}: kd_chunked / mlm_step = {chunked:.3f} (dense KD {dense:.3f}; target <= 1.10); "
              f"online_step / (teacher_forward + mlm_step) = {online:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
