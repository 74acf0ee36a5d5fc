"""The in-process parts of `python -m bench.gpu`: pretrain (bf16 KD step, MFU), chunked (output layer at 128k)
and online (a teacher inside the step); the batches and models the torchrun part (zero.py) shares.

Steps come from the project's own pieces: students are transformers' BertForMaskedLM built from a BertConfig
(random weights: timing does not depend on them), losses are named objectives through kdlib's DistillModule,
cached targets are cut by kdlib.teachers.outputs.rows_from_outputs and collated by kdlib.cache.collate_rows (the
trainer's batch format), updates and interleaved timing are bench.pretrain_step's, the output-layer variants
bench.kd_chunked's. Every function takes its device, so the code also runs (slowly, without memory figures) on a CPU.
"""

from __future__ import annotations

import contextlib
import gc
import math

import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM

from bench import kd_chunked
from bench.gpu.plan import (BIG_VOCAB, CHUNK, ONLINE_STUDENT, SEQ, STUDENTS, TEACHER, TOP_K, VOCAB, Settings,
                            Student, model_flops, row)
from bench.pretrain_step import adamw_update, median_ms_interleaved
from kdlib.cache import collate_rows
from kdlib.losses.objectives import ObjectiveConfig
from kdlib.runtime.speed import count_parameters
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule
from kdlib.training.providers import Offer

CACHED = [ObjectiveConfig("kd_topk", params={"missing_mass": "rest_bucket"})]
CACHED_OFFER = Offer(online_teacher=False, cached=frozenset({"topk_ids", "topk_logits", "teacher_lse"}))
ONLINE = [ObjectiveConfig("kd_kl")]  # the online teacher's full logits: no cache to cut them to a top-k
ONLINE_OFFER = Offer(online_teacher=True, cached=frozenset())
OUTPUT_VARIANTS = ("plain", "kd", "chunked256", "chunked1024")  # bench.kd_chunked.step's variants


def bert(spec: Student, vocab: int, seed: int, device):
    """A randomly initialised BertForMaskedLM of the shape, built on the device (train mode: dropout on)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                                          num_attention_heads=spec.heads, intermediate_size=spec.ffn))


def cached_batch(batch: int, hidden: int, device, seed: int = 0) -> dict:
    """`batch` full rows of SEQ random ids with cached-teacher-like targets: the top-k and log-sum-exp of random
    logits, cut per row as the pipeline caches them and collated as the trainer reads them, on the device."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(rng.integers(1000, VOCAB, size=(batch, SEQ)))
    mask = torch.ones_like(ids)
    outputs = TeacherOutputsConfig(top_k=TOP_K)
    rows = []
    for i in range(batch):  # one row at a time: never a (batch, SEQ, VOCAB) tensor on the host
        logits = torch.randn(1, SEQ, VOCAB, generator=gen) * 2
        (cut,) = rows_from_outputs({"logits": logits}, ids[i:i + 1], mask[i:i + 1], outputs, VOCAB)
        cut.update(id=str(i), input_ids=ids[i].numpy().copy())
        rows.append(cut)
    collated = collate_rows(rows, top_k=TOP_K, hidden_size=hidden)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated.items()}


def kd_module(student, hidden: int, objectives=CACHED, offer=CACHED_OFFER) -> DistillModule:
    return DistillModule(student, objectives, offer, teacher_width=hidden, seed=0, logit_chunk_size=CHUNK)


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bf16(device: torch.device):
    """A context factory: torch.autocast to bf16 on the device (the pretrain step's precision)."""
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def timed(steps: dict, settings: Settings, seconds: float, sync) -> tuple[dict, int]:
    """(median ms per step of each variant, rounds timed): `settings.warmup` untimed steps of each, one round to
    learn a round's cost, then as many interleaved rounds as fit `seconds` (at least 3)
    (bench.pretrain_step.median_ms_interleaved, which adds one more untimed step of each)."""
    for _ in range(settings.warmup):
        for fn in steps.values():
            fn()
    sync()
    once = median_ms_interleaved(steps, 1, sync)
    rounds = max(3, math.ceil(seconds * 1000 / max(sum(once.values()), 1e-3)))
    return median_ms_interleaved(steps, rounds, sync), rounds


def peak_memory(fn, device: torch.device) -> tuple[float | None, float | None]:
    """(torch.cuda.max_memory_allocated over one step, how far it exceeds the memory allocated before it), MiB;
    (None, None) off CUDA."""
    if device.type != "cuda":
        fn()
        return None, None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def release(device: torch.device) -> None:
    """Free what a part left behind before the next one measures memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pretrain(settings: Settings, device: torch.device) -> dict:
    """Part pretrain: per student, the bf16 KD step's ms, tokens/s and MFU, and its peak memory."""
    rows, sync, tokens, autocast = [], sync_for(device), settings.batch * SEQ, bf16(device)
    batch = cached_batch(settings.batch, STUDENTS[ONLINE_STUDENT].hidden, device)  # one for both (no hidden vectors)
    for name, spec in STUDENTS.items():
        student = bert(spec, VOCAB, 1, device)
        module, update = kd_module(student, spec.hidden), adamw_update(student.parameters())

        def step():
            with autocast():
                loss = module(batch)[0]
            update(loss)

        ms, rounds = timed({name: step}, settings, settings.seconds / len(STUDENTS), sync)
        peak, grown = peak_memory(step, device)
        params = count_parameters(student)
        rows.append(row("pretrain", f"{name} kd_topk step, batch {settings.batch}x{SEQ}", ms[name], tokens,
                        flops=model_flops(params, spec.layers, SEQ, spec.hidden, tokens), peak=settings.peak_tflops,
                        peak_mib=peak, step_mib=grown, student=name, parameters=params, rounds=rounds))
        del student, module, update, step
        release(device)
    del batch
    release(device)
    return {"rows": rows, "notes": [f"bf16 = torch.autocast over fp32 weights; kd_topk (rest bucket) on cached "
                                    f"top-{TOP_K} targets, chunked logits ({CHUNK} positions), torch AdamW; "
                                    "median step of the timed rounds"]}


def chunked(settings: Settings, device: torch.device) -> dict:
    """Part chunked: bench.kd_chunked's output-layer steps at a 131,072 vocabulary, fp32 and bf16 autocast."""
    hidden, positions, sync = STUDENTS[ONLINE_STUDENT].hidden, settings.batch * SEQ, sync_for(device)
    x = {k: v.to(device) for k, v in kd_chunked.inputs(BIG_VOCAB, positions, hidden).items()}
    rows, ratios = [], {}
    for precision, context in (("fp32", contextlib.nullcontext), ("bf16", bf16(device))):
        def variant_step(v, context=context):
            def run():
                with context():
                    kd_chunked.step(v, x)
            return run

        steps = {v: variant_step(v) for v in OUTPUT_VARIANTS}
        ms, rounds = timed(steps, settings, settings.seconds / 2, sync)
        for v in OUTPUT_VARIANTS:
            peak, grown = peak_memory(steps[v], device)
            rows.append(row("chunked", f"{precision} {v}, {positions:,} positions x {BIG_VOCAB:,}", ms[v], positions,
                            peak_mib=peak, step_mib=grown, precision=precision, variant=v, rounds=rounds))
        kd_ms = ms["kd"]
        ratios[precision] = {v: ms[v] / kd_ms for v in OUTPUT_VARIANTS}
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    del x
    release(device)
    return {"rows": rows, "time_over_dense_kd": ratios,
            "notes": [f"hidden {hidden}, top-{TOP_K} rest-bucket KD; plain = masked-LM CE at 15% of positions; "
                      f"kd = dense (positions, vocabulary) logits; chunkedN = chunked_kd_topk, N positions a chunk; "
                      f"fp32 matmuls {'with' if tf32 else 'without'} TF32; step MiB = peak over the memory before "
                      "the step (inputs resident)",
                      "ms / dense kd: " + "; ".join(f"{p} " + ", ".join(f"{v} {r:.2f}" for v, r in rs.items())
                                                     for p, rs in ratios.items())]}


def online(settings: Settings, device: torch.device) -> dict:
    """Part online: the KD step with the teacher run inside it against the step on cached targets."""
    spec, tspec = STUDENTS[ONLINE_STUDENT], STUDENTS[TEACHER]
    tokens, sync, autocast = settings.batch * SEQ, sync_for(device), bf16(device)
    student = bert(spec, VOCAB, 1, device)
    teacher = bert(tspec, VOCAB, 0, device).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher = teacher.to(torch.bfloat16)  # as pretrain's online teacher: the engine's precision on a GPU
    cached_kd, online_kd = kd_module(student, tspec.hidden), kd_module(student, tspec.hidden, ONLINE, ONLINE_OFFER)
    update, batch = adamw_update(student.parameters()), cached_batch(settings.batch, spec.hidden, device)
    logits = online_kd.teacher_reads_logits()

    @torch.no_grad()
    def teacher_forward():
        with autocast():
            return run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=False, qkv=False,
                             heads=tspec.heads, logits=logits)

    def step(module, view=lambda: None):
        def run():
            with autocast():
                loss = module(batch, view())[0]
            update(loss)
        return run

    steps = {"cached_step": step(cached_kd), "online_step": step(online_kd, teacher_forward),
             "teacher_forward": teacher_forward}
    ms, rounds = timed(steps, settings, settings.seconds, sync)
    sp, tp = count_parameters(student), count_parameters(teacher)
    student_flops = model_flops(sp, spec.layers, SEQ, spec.hidden, tokens)
    teacher_flops = model_flops(tp, tspec.layers, SEQ, tspec.hidden, tokens, backward=False)
    flops = {"cached_step": student_flops, "online_step": student_flops + teacher_flops,
             "teacher_forward": teacher_flops}
    what = {"cached_step": f"{ONLINE_STUDENT} kd_topk on cached targets",
            "online_step": f"{ONLINE_STUDENT} kd_kl on a {TEACHER} teacher run in the step",
            "teacher_forward": f"{TEACHER} teacher forward alone (bf16, no_grad)"}
    rows = []
    for name, fn in steps.items():
        peak, grown = peak_memory(fn, device)
        rows.append(row("online", f"{what[name]}, batch {settings.batch}x{SEQ}", ms[name], tokens, flops=flops[name],
                        peak=settings.peak_tflops, peak_mib=peak, step_mib=grown, variant=name, rounds=rounds))
    ratio = ms["online_step"] / ms["cached_step"]
    del student, teacher, cached_kd, online_kd, update, batch, steps
    release(device)
    return {"rows": rows, "online_over_cached": ratio, "student_parameters": sp, "teacher_parameters": tp,
            "notes": [f"online_step / cached_step = {ratio:.2f} (time per step); online_step / (cached_step + "
                      f"teacher_forward) = {ms['online_step'] / (ms['cached_step'] + ms['teacher_forward']):.2f}; "
                      "MFU of online_step counts the teacher's forward (2 N T + 4 L S H T); peak MiB includes the "
                      "teacher's weights in every row"]}


PARTS = {"pretrain": pretrain, "chunked": chunked, "online": online}
