"""General distillation on the shared training core: build the student, its objectives' module, the
batches, the online teacher; hand them to `kdlib.training.loop`; export at the end.

Everything stage-independent (the loop, checkpoints, resume, preemption, input providers) lives in
kdlib/training/; this file says only what general distillation is made of.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdlib.training.cross_tokenizer import AlignedBatches, piece_texts
from kdlib.training.deepspeed_engine import logit_chunk_size
from kdlib.runtime.models import ModelConfig, load_model, load_tokenizer
from kdlib.training.progressive import ProgressiveTransfer
from kdlib.training import loop
from kdlib.training.batches import BatchStream
from kdlib.training.internals import run_model
from kdlib.training.module import DistillModule
from kdlib.training.sampler import DistributedBatchSampler
from pretrain.config import PretrainConfig
from pretrain.evaluate import next_token_perplexity, piece_agreement, probe_logits, top1_agreement
from pretrain.export import export_student
from pretrain.student import build_student
from pretrain.validate import Setup

PROBE = "probe_logits.safetensors"
STAGE = "python -m pretrain"


def build_module(cfg: PretrainConfig, setup: Setup) -> DistillModule:
    """The student (seed), its projections (seed + 1) and, for mutual learning, a peer student (seed + 2)."""
    student = build_student(cfg.teacher, setup.teacher_config, cfg.student, cfg.seed)
    peer = partial(build_student, cfg.teacher, setup.teacher_config, cfg.student, cfg.seed + 2)
    emd_temperature = cfg.layer_map.emd_temperature if cfg.layer_map is not None else 1.0
    progressive = ProgressiveTransfer(cfg.progressive, cfg.student.num_layers) if cfg.progressive is not None else None
    return DistillModule(student, cfg.objectives, setup.offer, teacher_width=setup.teacher_config.hidden_size,
                         seed=cfg.seed, peer_factory=peer, emd_temperature=emd_temperature, progressive=progressive,
                         logit_chunk_size=logit_chunk_size(cfg.engine, cfg.objectives))


def online_teacher(cfg: PretrainConfig, setup: Setup, module: DistillModule, device):
    """The frozen teacher as a function of a batch: eval mode, no gradients, the engine's precision on GPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision) if device.type != "cpu" else None
    teacher = load_model(ModelConfig(path=cfg.teacher.path, task=cfg.teacher.task,
                                     trust_remote_code=cfg.teacher.trust_remote_code), dtype=dtype)
    teacher.requires_grad_(False)
    teacher = teacher.to(device).eval()
    hidden, qkv = module.teacher_needs()
    logits = module.teacher_reads_logits()
    heads = setup.teacher_config.num_attention_heads

    @torch.no_grad()
    def run(batch: dict):
        return run_model(teacher, batch["input_ids"], batch["attention_mask"], hidden=hidden, qkv=qkv, heads=heads,
                         logits=logits)

    return run


def cross_tokenizer_reading(cfg: PretrainConfig, setup: Setup, student):
    """(load, agreement) for a student with its own tokenizer: batches aligned on character spans, and the
    held-out agreement as "the same next piece of text" (the two top-1 tokens' text) at aligned positions."""
    tokenizer = load_tokenizer(str(setup.student_tokenizer_folder), model_config={})
    aligned = AlignedBatches(tokenizer, max_length=student.config.max_position_embeddings)
    teacher_pieces = piece_texts(load_tokenizer(str(setup.teacher_folder)))
    student_pieces = piece_texts(tokenizer)

    def load(indices: list[int]) -> dict:
        return aligned(teacher_load_text(indices))

    def teacher_load_text(indices: list[int]) -> dict:
        return setup.transfer_set.batch(indices, pad_id=setup.teacher_config.pad_token_id or 0, text=True)

    def agreement(model, load_fn, indices, size, device) -> float:
        return piece_agreement(model, load_fn, indices, size, device, teacher_pieces, student_pieces)

    return load, agreement


def train(cfg: PretrainConfig, setup: Setup) -> int:
    """Run (or resume) the job; returns the exit code (0, or 75 after a preemption signal)."""
    return loop.run(cfg, STAGE, partial(build_job, cfg, setup))


def build_job(cfg: PretrainConfig, setup: Setup, session: loop.Session) -> loop.Job:
    """The student's module, the batches, the online teacher, the held-out check and the export, for the loop."""
    rank0, device = session.place.rank == 0, session.device
    out = Path(cfg.output_dir)
    module = build_module(cfg, setup)
    teacher = online_teacher(cfg, setup, module, device) if cfg.online_teacher else None

    ts = setup.transfer_set
    train_rows = len(ts) - cfg.eval_rows
    eval_indices = list(range(train_rows, len(ts)))
    pad_id = setup.teacher_config.pad_token_id or 0

    def load(indices: list[int]) -> dict:  # the reader is thread-safe: prefetch and evaluation share it
        return ts.batch(indices, pad_id=pad_id)

    agreement = top1_agreement
    if cfg.student.tokenizer is not None:  # the student's own tokenization, the teacher's values at aligned spans
        load, agreement = cross_tokenizer_reading(cfg, setup, module.student)

    world = session.place.world_size
    sampler = DistributedBatchSampler(train_rows, micro_batch=cfg.engine.micro_batch,
                                      grad_accum=cfg.engine.accumulation(world), rank=session.place.rank,
                                      world_size=world, seed=cfg.seed)
    batches = BatchStream(sampler, load, depth=cfg.prefetch, pin_memory=device.type == "cuda")

    def evaluate(student) -> dict:
        metrics = {"top1_agreement": agreement(student, load, eval_indices, cfg.engine.micro_batch, device)}
        if setup.offer.causal:
            metrics["perplexity"] = next_token_perplexity(student, load, eval_indices, cfg.engine.micro_batch, device)
        return metrics

    def finish(student, final_checkpoint, module_state, step: int, metrics: dict) -> str:
        probe = probe_logits(student, load, eval_indices[:cfg.engine.micro_batch], device)  # every rank (ZeRO-3)
        if not rank0:
            return ""
        save_file(probe, str(out / PROBE))
        export_student(cfg, setup, final_checkpoint, module_state, out / "export", step)
        perplexity = f", next-token perplexity {metrics['perplexity']:.2f}" if "perplexity" in metrics else ""
        return (f"held-out top-1 agreement with the teacher {metrics['top1_agreement']:.4f}{perplexity}; "
                f"exported to {out / 'export'}")

    return loop.Job(config=cfg, ds_config=setup.ds_config, module=module, batches=batches, evaluate=evaluate,
                    finish=finish, teacher=teacher, name="pretrain")
