"""The training loop every stage runs, top to bottom: start, resume, step, log, evaluate, checkpoint,
stop on a preemption signal, finish.

A stage supplies a `Job`: its config (inheriting `LoopConfig`), the DeepSpeed JSON, the module to
train (`DistillModule`), its batches (`BatchStream`), an optional online teacher, its evaluation and
its finish (export). One optimizer step = `grad_accum` micro-batches per rank (derived from
`engine.global_batch` when that is set, so the step is the same at any world size). After each step the
loss parts, the token count, the preemption flag of every rank and any loss-side statistics (BERT-EMD
costs) are combined in ONE all-reduce: the step's only host sync (on GPU it also waits for the step
to finish, which is what tokens/s should measure anyway).
"""

from __future__ import annotations

import json
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from kdlib.training.checkpoints import (checkpoint_steps, latest_checkpoint, load_checkpoint, needs_universal,
                                       save_checkpoint)
from kdlib.runtime.process_group import (DistEnv, all_reduce_sum, barrier, dist_env, init_distributed, lost_peer,
                                         shutdown)
from kdlib.training.deepspeed_engine import initialize
from kdlib.runtime.digests import verify_digests
from kdlib.runtime.io import atomic_write_text
from kdlib.runtime.metrics import MetricsWriter, read_metrics
from kdlib.errors import KDError, OutputError
from kdlib.runtime.outputs import check_output_folder, output_lock, save_resolved
from kdlib.runtime.plots import loss_curve
from kdlib.training import state as ckpt
from kdlib.training.architectures import use_architectures
from kdlib.training.config import math_hash, reads_total_steps
from kdlib.training.early_stop import EarlyStopping
from kdlib.training.preempt import REQUEUE_EXIT_CODE, StopFlag, requeue_message


# The marks by which a stage knows a run folder: run.json is written before anything else of a run (a
# transfer set or a teacher folder also holds a resolved_config.yaml, so that alone proves nothing).
RUN_STAMP = "run.json"
RUN_MARKS = (RUN_STAMP, "metrics.jsonl", "checkpoints", "slurm")  # slurm/: the SLURM launcher's logs


def check_run_folder(output_dir: str, stage: str, resume: bool = True) -> None:
    """Refuse, before any work, an output_dir that holds anything but a run of this project (a teacher folder,
    a transfer set, a person's files): a run writes checkpoints, metrics and an export into it. A run folder
    with checkpoints is refused with `resume: false`, which would train afresh over them. Whether a
    checkpoint may be resumed is the math hash's business (Trainer.resume)."""
    out = Path(output_dir)
    ours = out.is_dir() and any((out / mark).exists() for mark in RUN_MARKS)
    check_output_folder(out, stage=stage, found_claim="run" if ours else None, claim="run", overwrite=False)
    steps = checkpoint_steps(out / "checkpoints")
    if not resume and steps:
        raise OutputError(f"output_dir: {out} holds a run with checkpoints up to step {steps[-1]}; resume: false "
                          "would train afresh and replace them. Nothing was changed: choose another output_dir "
                          "(or resume: true to continue that run)")


@dataclass
class Session:
    """This process's place in the job, started before any slow work so that an early SIGTERM is kept."""

    place: DistEnv
    flag: StopFlag
    device: torch.device
    held: ExitStack = field(default_factory=ExitStack)  # the output folder's lock, released by train()


def start(config, stage: str = "train") -> Session:
    """The output folder's lock, threads, the preemption flag, the process group; call first, then build the
    stage's modules. A second job writing into the same output_dir is refused here, on every rank."""
    held = ExitStack()
    rank = dist_env().rank
    held.enter_context(output_lock(config.output_dir, stage, rank))
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        flag = StopFlag().install()
        place = init_distributed(config.engine.dist_backend)
    except BaseException:
        held.close()
        raise
    device = torch.device("cuda", place.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Session(place, flag, device, held)


def _release(session: Session) -> None:
    try:
        shutdown()
    finally:
        session.held.close()


@dataclass
class Job:
    """What a stage hands the loop."""

    config: Any  # the stage config: LoopConfig fields, `objectives`, `engine`
    ds_config: dict  # DeepSpeed JSON (kdlib.training.deepspeed_engine.deepspeed_config)
    module: torch.nn.Module  # DistillModule: student (+ projections, peer) and the objectives
    batches: Any  # BatchStream over this rank's share of the training rows
    evaluate: Callable[[torch.nn.Module], dict]  # held-out metrics of the student; every rank calls it (ZeRO-3)
    finish: Callable[..., str]  # every rank, after the last step: (student, final checkpoint, ZeRO-0 state, step,
    #                              final eval metrics) -> a summary line (rank 0)
    teacher: Optional[Callable[[dict], Any]] = None  # the online teacher on a batch -> ModelView (no grad)
    name: str = "train"  # progress-bar label


def seed_rank(seed: int, rank: int) -> None:
    """Dropout and any other randomness differ per rank but are fixed by (seed, rank)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def seed_new_rank(seed: int, rank: int, step: int) -> None:
    """A rank that a checkpoint holds no RNG state for (the run resumed on more ranks than it saved): its
    randomness is fixed by (seed, rank, step), distinct from every other rank's stream."""
    mixed = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    random.seed(mixed)


@dataclass
class Found:
    """The checkpoint a run resumes from, read before the engine is built (its world size decides how it loads)."""

    folder: Path
    state: dict  # trainer_state.json, accepted under this config's math hash and global batch
    saved_world: int  # the world size it was saved at
    universal: bool  # loaded through DeepSpeed's universal checkpoint (ZeRO-1/2 at another world size)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Owns the engine, the step counter and the data position; state_dict() is what a checkpoint restores."""

    def __init__(self, session: Session, job: Job):
        self.session, self.job, self.cfg = session, job, job.config
        self.rank0 = session.place.rank == 0
        self.out = Path(self.cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.progressive = getattr(job.module, "progressive", None)
        self.world = session.place.world_size
        self.global_batch = int(job.ds_config["train_batch_size"])  # micro_batch x grad_accum x world size
        self.hash = math_hash(self.cfg)
        self.found = self.find_checkpoint()  # before the engine: a refused checkpoint costs no engine build
        ds_config = job.ds_config
        if self.found is not None and self.found.universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        self.engine = initialize(job.module, ds_config, self.cfg.engine.optim,
                                    num_layers=job.module.student.config.num_hidden_layers,
                                    by_depth=self.progressive is not None,
                                    rates=getattr(job.module.student, "learning_rates", dict)())
        self.module = self.engine.module
        self.names = [o.name for o in self.cfg.objectives]
        self.step, self.tokens_seen = 0, 0
        self.stopper = None
        if getattr(self.cfg, "early_stopping", None) is not None:
            if self.cfg.engine.zero_stage == 3:
                raise OutputError("early_stopping: keeps the best weights from every rank's full copy, which ZeRO-3 "
                                  "does not hold; use engine.zero_stage 0-2")
            self.stopper = EarlyStopping(self.cfg.early_stopping, self.out)
        seed_rank(self.cfg.seed, session.place.rank)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.job.batches.sampler.state_dict(),
                "loss_state": self.module.loss_state_dict(), "config_hash": self.hash, "steps": self.cfg.steps,
                "reads_total_steps": reads_total_steps(self.cfg), "world_size": self.world,
                "global_batch": self.global_batch,
                **({"early_stopping": self.stopper.state_dict()} if self.stopper is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.job.batches.sampler.load_state_dict(state["sampler"])
        self.module.load_loss_state_dict(state.get("loss_state", {}))
        if self.stopper is not None:
            self.stopper.load_state_dict(state["early_stopping"])

    def find_checkpoint(self) -> Optional[Found]:
        """`latest`, checked: digests, math hash, global batch; and whether its world size needs a universal load."""
        latest = latest_checkpoint(self.ckpt_dir) if self.cfg.resume else None
        if latest is None:
            return None
        verify_digests(latest)  # before anything in it is read, let alone unpickled by DeepSpeed
        saved = ckpt.read_trainer_state(latest, self.hash, self.cfg.steps)
        saved_world = ckpt.check_world(latest, saved, self.world, self.global_batch)
        stage = self.job.ds_config["zero_optimization"]["stage"]
        return Found(latest, saved, saved_world, needs_universal(latest, stage, saved_world, self.world))

    def resume(self) -> Optional[Path]:
        """Restore from the checkpoint `find_checkpoint` accepted (at this world size or another)."""
        found, rank = self.found, self.session.place.rank
        if found is None:
            return None
        load_checkpoint(self.engine, found.folder, verified=True, universal=found.universal)
        self.load_state_dict(found.state)
        own = found.folder / ckpt.rng_file(rank)
        if own.is_file():
            ckpt.restore_rng_state(own.read_text())
        elif rank >= found.saved_world:  # more ranks than were saved
            seed_new_rank(self.cfg.seed, rank, self.step)
        else:
            raise KDError(f"{found.folder}: no {own.name}, though rank {rank} of {found.saved_world} saved it")
        return found.folder

    def save(self) -> Path:
        side = {ckpt.TRAINER_STATE: ckpt.write_trainer_state(self.state_dict(), self.cfg)}
        rank_files = {ckpt.rng_file(self.session.place.rank): ckpt.rng_state_json()}
        return save_checkpoint(self.engine, self.ckpt_dir, self.step, side, rank_files, self.cfg.keep_checkpoints)

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self) -> tuple[list[float], int, bool]:
        """grad_accum micro-batches (DeepSpeed's), one all-reduce; returns (mean losses [total, parts...], global tokens, stop)."""
        device, n = self.session.device, len(self.names)
        sums = torch.zeros(n + 1, dtype=torch.float64, device=device)  # total, parts...
        tokens = 0
        micro = self.job.batches.next_step()
        if len(micro) != self.engine.gradient_accumulation_steps():  # else DeepSpeed steps mid-step, or not at all
            raise KDError(f"engine: the batch order gives {len(micro)} micro-batches per step, DeepSpeed accumulates "
                          f"{self.engine.gradient_accumulation_steps()}; the stage must build its sampler with "
                          f"EngineConfig.accumulation(world_size) (engine.global_batch), not grad_accum")
        for batch in micro:
            tokens += batch.pop("num_tokens")
            batch = to_device(batch, device)
            teacher = self.job.teacher(batch) if self.job.teacher is not None else None
            total, parts = self.engine(batch, teacher, self.step, self.cfg.steps)
            self.engine.backward(total)
            self.engine.step()
            sums += torch.stack([total.detach()] + [parts[name].detach() for name in self.names]).double()
            del batch, teacher, total, parts  # free the step's activations before the next micro-batch
        extra = torch.tensor([tokens, float(self.session.flag.requested)], dtype=torch.float64)
        combined = torch.cat([sums, extra.to(device), self.module.statistics().to(device)])
        all_reduce_sum(combined)  # the step's one collective and host sync
        combined = combined.cpu()
        self.module.finish_step(combined[n + 3:])
        self.step += 1
        world_micro = self.world * self.engine.gradient_accumulation_steps()
        return (combined[:n + 1] / world_micro).tolist(), int(combined[n + 1]), bool(combined[n + 2] > 0)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, metrics: MetricsWriter) -> dict:
        """Held-out metrics, logged; with early stopping, the best weights so far saved (rank 0)."""
        values = self.job.evaluate(self.module.student)
        metrics.write({"kind": "eval", "step": self.step, **values})
        if self.stopper is not None and self.stopper.update(values, self.step) and self.rank0:
            self.stopper.save(self.module.student)
        return values

    def stopped_early(self) -> bool:
        return self.stopper is not None and self.stopper.stopped

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train to `steps` (or until a preemption signal); returns 0, or REQUEUE_EXIT_CODE after a checkpoint."""
        cfg, job = self.cfg, self.job
        resumed = self.resume()
        if self.rank0:
            if not (self.out / RUN_STAMP).exists():
                atomic_write_text(self.out / RUN_STAMP, json.dumps({"stage": job.name, "created": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
            save_resolved(cfg, self.out)  # after the resume check: a refused resume leaves the record as it was
            if resumed is not None:
                moved = (f", saved at world size {self.found.saved_world}, now {self.world}"
                         if self.found.saved_world != self.world else "")
                print(f"resumed from {resumed} (step {self.step}{moved})", flush=True)
        metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.rank0)
        student = self.module.student
        if self.step == 0:
            self.evaluate(metrics)
        job.batches.start()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=job.name, dynamic_ncols=True,
                   disable=not (self.rank0 and cfg.progress_bar) or None)  # None: quiet when not a terminal
        run_start, run_tokens, last_ckpt = time.perf_counter(), 0, None
        self.engine.train()
        try:
            while self.step < cfg.steps and not self.stopped_early():
                started = time.perf_counter()
                stage = {}
                if self.progressive is None:
                    lr = self.engine.optimizer.param_groups[0]["lr"]  # the rate this step uses
                else:  # the layer in training at its scheduled rate, the others scaled (kdlib.training.progressive)
                    lr = self.progressive.apply_rates(self.engine.optimizer.param_groups, self.step)
                    stage = {"layer_in_training": self.progressive.layer_at(self.step) or 0}  # 0: joint phase
                losses, tokens, stop = self.train_step()
                seconds = time.perf_counter() - started
                self.tokens_seen += tokens
                run_tokens += tokens
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    metrics.write({"kind": "train", "step": self.step, "loss": losses[0],
                                   **dict(zip(self.names, losses[1:])), "lr": lr, "tokens": tokens,
                                   "tokens_per_s": tokens / seconds, "epoch": job.batches.sampler.state.epoch,
                                   **stage})
                    bar.set_postfix(loss=f"{losses[0]:.4f}", tok_s=f"{tokens / seconds:,.0f}")
                bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate(metrics)
                if stop or self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or self.stopped_early():
                    last_ckpt = self.save()
                if stop:
                    if self.rank0:
                        print(requeue_message(self.step, last_ckpt), flush=True)
                    metrics.close()
                    return REQUEUE_EXIT_CODE
        except RuntimeError as err:  # a collective that lost a rank: name its node and what survives
            lost = lost_peer(err)
            if lost is not None:
                kept = latest_checkpoint(self.ckpt_dir)
                print(f"error: lost {lost} during step {self.step + 1}: {str(err).splitlines()[0][:200]}; "
                      f"the last complete checkpoint is {kept if kept else 'none yet'}; rerun (or let SLURM requeue) "
                      "to resume from it", file=sys.stderr, flush=True)
            raise
        finally:
            job.batches.close()
            bar.close()
        elapsed = time.perf_counter() - run_start

        final_metrics = self.evaluate(metrics) if not self.stopped_early() else {}
        if self.stopper is not None:  # the export and the final metrics are the best weights'
            barrier()  # rank 0 has written them
            self.stopper.restore(student)
            final_metrics = {**job.evaluate(student), "best_step": self.stopper.best_step}
            if self.rank0:
                print(f"early stopping: best {cfg.early_stopping.metric} {self.stopper.best:.4f} at step "
                      f"{self.stopper.best_step} (stopped at step {self.step})", flush=True)
        module_state = None
        if cfg.engine.zero_stage == 0:
            module_state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        summary = job.finish(student, latest_checkpoint(self.ckpt_dir), module_state, self.step, final_metrics)
        if self.rank0:
            loss_curve(read_metrics(self.out / "metrics.jsonl"), ["loss"] + self.names, self.out / "loss_curve.png")
            rate = f"{run_tokens / elapsed:,.0f} tokens/s (global)" if run_tokens else "no steps run"
            print(f"done: {self.step} steps; {summary}; {rate}", flush=True)
        metrics.close()
        barrier()
        return 0


def run(config, stage: str, build_job: Callable[[Session], Job]) -> int:
    """The one recipe every training stage follows: start (lock, process group), build the stage's job, train,
    finish; returns the exit code (0, or 75 after a preemption signal). Whatever fails, in building (a model that
    does not load, a transfer set of another teacher) or in training, the process group is closed and the output
    folder's lock released before the error propagates."""
    use_architectures(getattr(config, "architectures", {}))  # before any model is built or hooked
    session = start(config, stage)
    try:
        job = build_job(session)
        return Trainer(session, job).run()
    finally:
        _release(session)
