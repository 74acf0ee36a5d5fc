"""Cost of causal (decoder) distillation over plain causal-LM training, measured side by side on the same batches.

    python -m bench.causal_step [--shape tiny|1b] [--batch B --length T --rounds R --threads N --vocab V]
                                [--device cpu|cuda] [--precision fp32|bf16] [--no-memory] [--force]

The variants run interleaved, one of each per round, on one student and optimizer; the median round is reported
(bench.pretrain_step's machinery):
  lm_step     a plain causal-LM step: transformers' own loss (labels = the ids, padding -100) + backward + AdamW
  kd_dense    `kd_topk` at every real position from the cached top-k + `next_token_ce` (weight 0.5) through
              DistillModule, dense logits (engine.chunked_logits: off)
  kd_chunked  the same with the output layer chunked, 256 positions a chunk (chunked_logits: auto, the default)
Peak memory (on by default on CPU, off on cuda): how far one step's peak exceeds the memory before it, each
variant in a fresh process after a warm-up step on a 2 x 16 batch, high-water mark reset (resident set through
kdlib.runtime.speed on CPU; torch's allocated device memory on cuda).
Shapes (random weights: timing does not depend on them):
  tiny  GPT-2 (GPT2LMHeadModel) student, 4 layers, width 256, 8 heads, vocabulary 50,257, batch 8 x 128; the
        cached rows come from a 6-layer same-width random GPT-2 teacher's forward
  1b    Llama-3.2-1B-shaped (LlamaConfig: hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
        vocabulary 128,256, tied embeddings), batch 8 x 1024, for a GPU (--device cuda --precision bf16); the
        cached rows come from the student-shaped model's own forward, once, before any step (no deeper teacher)
Either way the batch is in the real transfer-set format: top-32 ids/logits and log-sum-exp cut per row by
kdlib.teachers.outputs.rows_from_outputs and collated by kdlib.cache.collate_rows (rows of 3/4 to all of T tokens).
bf16 is torch.autocast over fp32 weights (DeepSpeed's bf16 keeps bf16 weights and fp32 master weights instead:
the same matmul precision, other weight and optimizer memory). On cuda, MFU = model FLOPs 6 x parameters x real
(unpadded) tokens per step / step time / 989 TFLOP/s, the H100/H200 SXM bf16 dense peak (a fp32 run is held to
the same peak); it counts no attention FLOPs and none of the KD loss, so kd MFU below lm MFU is KD overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json

import numpy as np
import torch

from bench.pretrain_step import adamw_update, fresh_process_peak_mib, median_ms_interleaved, random_padded_ids
from kdlib.cache import collate_rows
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.schemas import TeacherOutputsConfig
from kdlib.runtime.speed import count_parameters
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
from kdlib.training.providers import Offer
from kdlib.training.module import DistillModule

CHUNK, TOP_K, PEAK_TFLOPS = 256, 32, 989.0  # chunk = engine.logit_chunk_size's default; H100/H200 bf16 dense
VARIANTS = ("lm_step", "kd_dense", "kd_chunked")
SHAPES = {  # model settings, default batch and length; the teacher's layer count (None: the student's own forward)
    "tiny": dict(family="gpt2", hidden=256, layers=4, heads=8, kv_heads=8, ffn=1024, vocab=50257, batch=8,
                 length=128, teacher_layers=6),
    "1b": dict(family="llama", hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256, batch=8,
               length=1024, teacher_layers=None),
}


def build(shape: dict, layers: int, vocab: int, length: int, seed: int, device: str):
    """A randomly initialised causal LM of the shape (built on the device directly: no 1B-parameter CPU copy)."""
    # transformers' model classes: ~4 s to import; --help runs without them
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        if shape["family"] == "gpt2":
            return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=shape["hidden"], n_layer=layers,
                                              n_head=shape["heads"], n_inner=shape["ffn"],
                                              n_positions=max(1024, length)))
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=shape["hidden"], num_hidden_layers=layers,
                                            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                                            intermediate_size=shape["ffn"], max_position_embeddings=max(2048, length),
                                            tie_word_embeddings=True))


def make_batch(teacher, vocab: int, hidden: int, batch: int, length: int, seed: int, device: str, autocast) -> dict:
    """Right-padded random rows with the teacher's top-k, collated like the trainer, then moved to the device."""
    ids, mask, _ = random_padded_ids(np.random.default_rng(seed), vocab, batch, length)
    outputs = TeacherOutputsConfig(top_k=TOP_K)
    with autocast():
        logits = teacher_forward(teacher, ids.to(device), mask.to(device), outputs)["logits"]
    rows = rows_from_outputs({"logits": logits.cpu()}, ids, mask, outputs, vocab)
    for i, row in enumerate(rows):
        row.update(id=str(i), input_ids=ids[i, :int(mask[i].sum())].numpy().copy())
    collated = collate_rows(rows, top_k=TOP_K, hidden_size=hidden)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}


def setup(shape: str, vocab: int, batch_size: int, length: int, device: str = "cpu", precision: str = "fp32"):
    """(variant -> one step on the batch, the batch, the same steps on a 2 x 16 batch, student parameters) on
    one student and optimizer; the small batch warms up optimizer state and kernels (bench.pretrain_step)."""
    spec = SHAPES[shape]
    student = build(spec, spec["layers"], vocab, length, 1, device)
    teacher = student if spec["teacher_layers"] is None else build(spec, spec["teacher_layers"], vocab, length, 0,
                                                                   device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    autocast = (lambda: torch.autocast(device_type=device, dtype=dtype)) if dtype else contextlib.nullcontext
    objectives = [ObjectiveConfig("kd_topk"), ObjectiveConfig("next_token_ce", weight=0.5)]
    offer = Offer(online_teacher=False, cached=frozenset({"topk_ids", "topk_logits", "teacher_lse"}), causal=True)
    kd = {chunk: DistillModule(student, objectives, offer, teacher_width=spec["hidden"], seed=0, logit_chunk_size=chunk)
          for chunk in (0, CHUNK)}
    update = adamw_update(student.parameters())
    batches = [make_batch(teacher.eval(), vocab, spec["hidden"], b, t, seed, device, autocast)
               for b, t, seed in ((batch_size, length, 0), (2, 16, 1))]
    student.train()  # (the 1b teacher is the student: its cached top-k is taken before any step)
    del teacher

    def steps_on(batch: dict) -> dict:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)  # transformers shifts the labels itself

        def step(loss_fn):
            def run():
                with autocast():
                    loss = loss_fn()
                update(loss)
            return run

        return {"lm_step": step(lambda: student(input_ids=ids, attention_mask=mask, labels=labels).loss),
                "kd_dense": step(lambda: kd[0](batch)[0]),
                "kd_chunked": step(lambda: kd[CHUNK](batch)[0])}

    return steps_on(batches[0]), batches[0], steps_on(batches[1]), count_parameters(student)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.causal_step", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=0, help="rows per batch (default: the shape's)")
    parser.add_argument("--length", type=int, default=0, help="tokens per row (default: the shape's)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: the shape's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on cuda, else fp32")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    parser.add_argument("--memory", action="store_true", help="measure peak memory on cuda too")
    parser.add_argument("--force", action="store_true", help="run the 1b shape on CPU anyway")
    args = parser.parse_args(argv)
    spec = SHAPES[args.shape]
    args.batch, args.length, args.vocab = args.batch or spec["batch"], args.length or spec["length"], \
        args.vocab or spec["vocab"]
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if args.shape == "1b" and not cuda and not args.force:
        parser.error("--shape 1b is a 1.2B-parameter model meant for a GPU (--device cuda --precision bf16); on CPU "
                     "a step takes minutes and ~20 GB for weights and AdamW state alone. Pass --force to run it anyway")
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = not args.no_memory and (args.memory or not cuda)

    steps, batch, _, params = setup(args.shape, args.vocab, args.batch, args.length, args.device, args.precision)
    ms = median_ms_interleaved(steps, args.rounds, torch.cuda.synchronize if cuda else lambda: None)
    tokens = int(batch["attention_mask"].sum())
    del steps, batch  # the fresh processes below measure with this one's model and optimizer freed
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    setup_code = ("from bench.causal_step import setup; "
                  f"steps, _, small, _ = setup({args.shape!r}, {args.vocab}, {args.batch}, {args.length}, "
                  f"{args.device!r}, {args.precision!r})")
    peaks = {v: fresh_process_peak_mib(setup_code, v, cuda) for v in VARIANTS} if memory else {}
    mfu = {v: 6 * params * tokens / (ms[v] / 1000) / (PEAK_TFLOPS * 1e12) for v in VARIANTS} if cuda else {}

    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"shape {args.shape} ({params / 1e6:,.1f}M parameters, vocabulary {args.vocab:,}), batch {args.batch} x "
          f"{args.length} ({tokens:,} real tokens), top-k {TOP_K}, chunk {CHUNK}, {args.precision}, {where}, "
          f"rounds {args.rounds} (median)")
    print("| step | ms | tokens/s | ms / lm_step | peak MiB | peak / lm_step |" + (" MFU |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for v in VARIANTS:
        peak = f"{peaks[v]:,.0f} | {peaks[v] / peaks['lm_step']:.2f}" if peaks else "- | -"
        print(f"| {v} | {ms[v]:,.1f} | {tokens / ms[v] * 1000:,.0f} | {ms[v] / ms['lm_step']:.3f} | {peak} |"
              + (f" {mfu[v]:.1%} |" if cuda else ""))
    print(f"\nkd_dense / lm_step = {ms['kd_dense'] / ms['lm_step']:.3f}, kd_chunked / lm_step = "
          f"{ms['kd_chunked'] / ms['lm_step']:.3f} (step time; tokens/s ratios are the inverses)"
          + (f"; MFU counts 6 x parameters x real tokens over {PEAK_TFLOPS:g} TFLOP/s (H100/H200 bf16 dense)"
             if cuda else ""))
    print(json.dumps({
        "shape": args.shape, "parameters": params, "vocab": args.vocab, "batch": args.batch, "length": args.length,
        "tokens": tokens, "top_k": TOP_K, "chunk": CHUNK, "device": where, "precision": args.precision,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "ms": ms,
        "tokens_per_s": {v: tokens / ms[v] * 1000 for v in VARIANTS},
        "ratio_to_lm_step": {v: ms[v] / ms["lm_step"] for v in VARIANTS},
        "peak_mib": peaks or None, "peak_ratio_to_lm_step": {v: peaks[v] / peaks["lm_step"] for v in VARIANTS}
        if peaks else None, "mfu": mfu or None, "mfu_peak_tflops": PEAK_TFLOPS if cuda else None}))


if __name__ == "__main__":
    main()
