"""Distil a masked-LM student from a transfer set with transformers.Trainer (kdlib.api.DistillationTrainer).

One process:
    python examples/distill_with_trainer.py --transfer-set runs/demo/transfer_set --teacher runs/demo/teacher_mlm \
        --output-dir runs/trainer_student
Two processes (DDP; over gloo on a machine without GPUs, where accelerate 1.15's `--cpu --num_processes 2` would
start one process), or any accelerate config:
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/distill_with_trainer.py --transfer-set ... --teacher ... --output-dir ...
With the Trainer's DeepSpeed integration (ZeRO-2; without GPUs also export DS_ACCELERATOR=cpu):
    torchrun --nproc_per_node 2 examples/distill_with_trainer.py ... --deepspeed ds_zero2.json

The defaults are `python -m pretrain`'s for the same config (tests/transfer_fixture.py:base_config): a 2-layer
student of the teacher's shape, kd_topk + 0.5 mlm_ce, 8 rows x 2 micro-batches per process and step, AdamW 3e-3 with
2 warmup steps and the stage's warmup/decay schedule, clipping at 1.0, the last 64 rows held out. The student is
written to <output-dir>/export with the teacher's tokenizer; it loads with AutoModelForMaskedLM.from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: the project's kdlib

from kdlib.api import Distillation, DistillationTrainer, TransferSet  # noqa: E402
from kdlib.training.deepspeed_engine import OptimConfig  # noqa: E402

OBJECTIVES = [{"name": "kd_topk", "weight": 1.0}, {"name": "mlm_ce", "weight": 0.5}]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transfer-set", required=True, help="transfer-set folder (python -m data_pipeline)")
    p.add_argument("--teacher", required=True, help="the teacher folder: the student's shape and tokenizer come from it")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--objectives", default=json.dumps(OBJECTIVES), help="JSON list of {name, weight, params}")
    p.add_argument("--online-teacher", action="store_true", help="also run the teacher on every batch")
    p.add_argument("--layer-map", default=None,
                   help="uniform, skip or last: which teacher layer teaches which student layer")
    p.add_argument("--layers", type=int, default=2, help="student transformer layers")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per process per forward")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=64, help="the last rows, held out as python -m pretrain holds them")
    p.add_argument("--schedule", choices=["pretrain", "trainer"], default="pretrain",
                   help="pretrain: the stage's AdamW groups and warmup/decay; trainer: TrainingArguments' schedule")
    p.add_argument("--data-order", choices=["kdlib", "trainer"], default="kdlib",
                   help="kdlib: python -m pretrain's seed-driven order; trainer: the Trainer's shuffling")
    p.add_argument("--trainer-seeding", action="store_true",
                   help="leave dropout to the Trainer's seeding (one seed for every process), not seed + rank")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON for the Trainer's integration")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    transfer_set = TransferSet(args.transfer_set)
    train, _held_out = transfer_set.split(eval_rows=args.eval_rows)

    config = AutoConfig.from_pretrained(args.teacher, local_files_only=True)
    config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)  # the same initial weights as python -m pretrain with student.init: random
    student = AutoModelForMaskedLM.from_config(config)

    accelerator_config = None
    if args.deepspeed and not torch.cuda.is_available():
        # transformers 5.23 starts the Trainer's DeepSpeed integration with no process-group backend on a machine
        # without GPUs, so accelerate counts one process while DeepSpeed runs all of them; set the state up first
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}

    distillation = Distillation(json.loads(args.objectives), teacher=args.teacher if args.online_teacher else None,
                                student=student, transfer_set=transfer_set, seed=args.seed,
                                layer_map={"name": args.layer_map} if args.layer_map else None)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, lr_scheduler_type="linear",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=args.max_grad_norm,
        seed=args.seed, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available() and args.deepspeed is None,  # DeepSpeed: its own accelerator
        deepspeed=args.deepspeed, accelerator_config=accelerator_config)
    optim = OptimConfig(learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                        warmup_steps=args.warmup_steps) if args.schedule == "pretrain" else None
    trainer = DistillationTrainer(model=student, args=training_args, distillation=distillation, train_dataset=train,
                                  optim=optim, data_order=args.data_order, rank_seeds=not args.trainer_seeding,
                                  processing_class=AutoTokenizer.from_pretrained(args.teacher))
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "export"))
    if trainer.is_world_process_zero():
        last = trainer.history[-1]
        print(f"done: {last['step']} steps, loss {last['loss']:.4f} "
              + " ".join(f"{n} {last[n]:.4f}" for n in distillation.names)
              + f"; student in {os.path.join(args.output_dir, 'export')}", flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank leaves together, once everything is written, and skips the interpreter's teardown: on CPU
        # (gloo, under accelerate launch) a rank could abort there with "terminate called without an active
        # exception" after the work was done, both when left to exit and after destroy_process_group (2 of
        # ~10 fresh-clone runs), failing the launch although the student was saved.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
