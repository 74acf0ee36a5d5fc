"""The general-distillation loop, top to bottom: build, resume, train, checkpoint, export.

One optimizer step = `grad_accum` micro-batches per rank. After each step the loss parts, token
count and the preemption flag of every rank are combined in ONE all-reduce (a sync point; on GPU it
also waits for the step to finish, which is what tokens/s should measure anyway).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kdlib import engine as ds
from kdlib.config import save_resolved
from kdlib.metrics import MetricsWriter, read_metrics
from kdlib.models import ModelConfig, load_model
from kdlib.plots import loss_curve
from pretrain import state as ckpt_state
from pretrain.config import PretrainConfig
from pretrain.distill import PROJECTION_FOR, DistillModule, needs, run_with_internals
from pretrain.evaluate import probe_logits, top1_agreement
from pretrain.export import export_student
from pretrain.preempt import REQUEUE_EXIT_CODE, StopFlag, requeue_message
from pretrain.sampler import DistributedBatchSampler
from pretrain.student import build_student, make_projections
from pretrain.validate import Setup

PROBE = "probe_logits.safetensors"


def build_module(cfg: PretrainConfig, setup: Setup) -> DistillModule:
    student = build_student(cfg.teacher, setup.teacher_config, cfg.student, cfg.seed)
    wanted = sorted({PROJECTION_FOR[o.name] for o in cfg.objectives if o.name in PROJECTION_FOR})
    projections = make_projections(student.config.hidden_size, setup.teacher_config.hidden_size, wanted, cfg.seed)
    return DistillModule(student, projections, cfg.objectives, setup.pairs)


def load_online_teacher(cfg: PretrainConfig, device):
    """The frozen teacher, once per rank: eval mode, no gradients, in the engine's precision on GPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.engine.precision) if device.type != "cpu" else None
    teacher = load_model(ModelConfig(path=cfg.teacher.path, task=cfg.teacher.task,
                                     trust_remote_code=cfg.teacher.trust_remote_code), dtype=dtype)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def seed_rank(seed: int, rank: int) -> None:
    """Dropout and any other randomness differ per rank but are fixed by (seed, rank)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: PretrainConfig, setup: Setup) -> int:
    """Run (or resume) the job; returns the exit code (0, or REQUEUE_EXIT_CODE after a preemption signal)."""
    import torch.distributed as dist

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    flag = StopFlag().install()  # before the slow start-up, so an early SIGTERM is not lost
    place = ds.init_distributed(cfg.engine.dist_backend)
    rank0 = place.rank == 0
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    if rank0:
        save_resolved(cfg, out)
    module = build_module(cfg, setup)
    engine = ds.initialize(module, setup.ds_config, cfg.engine.optim)
    device = engine.device
    teacher = load_online_teacher(cfg, device) if cfg.online_teacher else None
    t_hidden, t_qkv = needs(cfg.objectives)
    t_heads = setup.teacher_config.num_attention_heads

    ts = setup.transfer_set
    train_rows = len(ts) - cfg.eval_rows
    eval_indices = list(range(train_rows, len(ts)))
    pad_id = setup.teacher_config.pad_token_id or 0
    sampler = DistributedBatchSampler(train_rows, micro_batch=cfg.engine.micro_batch, grad_accum=cfg.engine.grad_accum,
                                      rank=place.rank, world_size=place.world_size, seed=cfg.seed)
    seed_rank(cfg.seed, place.rank)
    math_hash = cfg.math_hash()
    step, tokens_seen = 0, 0
    latest = ds.latest_checkpoint(ckpt_dir) if cfg.resume else None
    if latest is not None:
        saved = ckpt_state.read_trainer_state(latest, math_hash)
        ds.load_checkpoint(engine, latest)
        sampler.load_state_dict(saved["sampler"])
        ckpt_state.restore_rng_state((latest / ckpt_state.rng_file(place.rank)).read_text())
        step, tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        if rank0:
            print(f"resumed from {latest} (step {step})", flush=True)

    metrics = MetricsWriter(out / "metrics.jsonl", enabled=rank0)
    student = engine.module.student
    evaluate = lambda: top1_agreement(student, ts, eval_indices, cfg.engine.micro_batch, pad_id, device)  # noqa: E731
    if step == 0:
        metrics.write({"kind": "eval", "step": 0, "top1_agreement": evaluate()})

    def save(at_step: int) -> Path:
        side = {ckpt_state.TRAINER_STATE: ckpt_state.trainer_state_json(at_step, sampler.state_dict(), cfg, math_hash,
                                                                        tokens_seen)}
        return ds.save_checkpoint(engine, ckpt_dir, at_step, side,
                                  {ckpt_state.rng_file(place.rank): ckpt_state.rng_state_json()}, cfg.keep_checkpoints)

    names = [o.name for o in cfg.objectives]
    bar = tqdm(total=cfg.steps, initial=step, disable=not (rank0 and cfg.progress_bar), desc="pretrain", dynamic_ncols=True)
    run_start, run_tokens, last_ckpt = time.perf_counter(), 0, None
    engine.train()
    while step < cfg.steps:
        start = time.perf_counter()
        lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
        sums = torch.zeros(len(names) + 3, dtype=torch.float64)  # total, parts..., tokens, stop flag
        for indices in sampler.next_step():
            batch = to_device(ts.collate(ts.rows(indices), pad_id=pad_id), device)
            internals = None
            if teacher is not None:
                with torch.no_grad():
                    _, internals = run_with_internals(teacher, batch["input_ids"], batch["attention_mask"],
                                                      hidden=t_hidden, qkv=t_qkv, heads=t_heads)
            total, parts = engine(batch, internals, step, cfg.steps)
            engine.backward(total)
            engine.step()
            sums[0] += total.detach().double().cpu()
            sums[1:1 + len(names)] += torch.stack([parts[n].detach().double().cpu() for n in names])
            sums[-2] += float(batch["attention_mask"].sum())
            del batch, internals, total, parts
        step += 1
        sums[-1] = float(flag.requested)
        dist.all_reduce(sums)  # one collective: mean losses, global tokens, any rank signalled
        seconds = time.perf_counter() - start
        tokens = int(sums[-2])
        tokens_seen += tokens
        run_tokens += tokens
        losses = (sums[:-2] / (place.world_size * cfg.engine.grad_accum)).tolist()
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"kind": "train", "step": step, "loss": losses[0], **dict(zip(names, losses[1:])), "lr": lr,
                      "tokens": tokens, "tokens_per_s": tokens / seconds, "epoch": sampler.state.epoch}
            metrics.write(record)
            bar.set_postfix(loss=f"{losses[0]:.4f}", tok_s=f"{tokens / seconds:,.0f}")
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics.write({"kind": "eval", "step": step, "top1_agreement": evaluate()})
        stop = sums[-1] > 0
        if stop or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            last_ckpt = save(step)
        if stop:
            bar.close()
            if rank0:
                print(requeue_message(step, last_ckpt), flush=True)
            metrics.close()
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
    bar.close()
    elapsed = time.perf_counter() - run_start

    agreement = evaluate()
    metrics.write({"kind": "eval", "step": step, "top1_agreement": agreement})
    probe = probe_logits(student, ts, eval_indices[:cfg.engine.micro_batch], pad_id, device)
    final = ds.latest_checkpoint(ckpt_dir)
    module_state = None
    if cfg.engine.zero_stage == 0:
        module_state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    if rank0:
        from safetensors.torch import save_file

        save_file(probe, str(out / PROBE))
        export_student(cfg, setup, final, module_state, out / "export", step)
        loss_curve(read_metrics(out / "metrics.jsonl"), ["loss"] + names, out / "loss_curve.png")
        rate = f"{run_tokens / elapsed:,.0f} tokens/s" if run_tokens else "no steps run"
        print(f"done: {step} steps; held-out top-1 agreement with the teacher {agreement:.4f}; {rate} "
              f"(global); exported to {out / 'export'}", flush=True)
    metrics.close()
    ds.barrier()
    dist.destroy_process_group()
    return 0
