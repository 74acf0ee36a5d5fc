"""Part zero2 of `python -m bench.gpu`: the KD step under DeepSpeed ZeRO-2 (bf16, NCCL) on every GPU.

`launch` starts `torchrun --standalone --nproc_per_node <GPUs> -m bench.gpu.zero ...` and reads what rank 0
wrote; `main` is what each rank runs: kdlib's process group and DeepSpeed engine (kdlib.runtime.process_group,
kdlib.training.deepspeed_engine, as `python -m pretrain` builds them) around the 12x768 student's DistillModule,
on cached-teacher-like batches (bench.gpu.steps). Ranks agree on the number of timed steps from a calibration
(one all-reduce), so every collective matches. Without CUDA (development only: the command refuses to start)
it runs on gloo in fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gpu.plan import SEQ, STUDENTS, VOCAB, ZERO_STUDENT, Settings, model_flops, row
from kdlib.runtime.cli import stage_parser
from kdlib.runtime.io import atomic_write_text

REPO = Path(__file__).resolve().parents[2]


def command(settings: Settings, out: str, gpus: str | int) -> list[str]:
    """The torchrun command line of the part (`gpus` may be a placeholder in a dry run)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--standalone", "--nproc_per_node", str(gpus), "-m", "bench.gpu.zero",
            "--batch", str(settings.batch), "--seconds", f"{settings.seconds:g}", "--warmup", str(settings.warmup),
            "--out", out]


def launch(settings: Settings, cuda: bool = True) -> dict:
    """Run the part on `settings.gpus` processes; its result rows (RuntimeError with the log's tail on failure)."""
    with tempfile.TemporaryDirectory(prefix="bench-gpu-zero-") as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = command(settings, str(out), settings.gpus)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   DS_ACCELERATOR="cuda" if cuda else "cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=settings.seconds + 300)  # + start-up, warm-up
        wall = time.perf_counter() - started
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"torchrun exited with status {proc.returncode}: {' '.join(cmd)}\n{tail}")
        result = json.loads(out.read_text())
    world = result["world_size"]
    spec = STUDENTS[ZERO_STUDENT]
    tokens = world * settings.batch * SEQ
    flops = world * model_flops(result["parameters"], spec.layers, SEQ, spec.hidden, settings.batch * SEQ)
    alone = " (the only GPU)" if world == 1 else ""
    measurement = (f"{ZERO_STUDENT} ZeRO-2 {result['precision']} {result['backend']}, world size {world}{alone}, "
                   f"batch {settings.batch}x{SEQ} per GPU")
    r = row("zero2", measurement, result["ms"], tokens, flops=flops, peak=settings.peak_tflops, gpus=world,
            peak_mib=result["peak_mib"], world_size=world, steps=result["steps"],
            tokens_per_s_per_gpu=tokens / (result["ms"] / 1000) / world, parameters=result["parameters"])
    scope = ("one GPU present: world size 1; the NCCL group and ZeRO-2's partitioned optimizer run, but no gradient "
             "crosses GPUs, so this is the engine's cost, not scaling" if world == 1 else f"world size {world}")
    return {"rows": [r], "world_size": world, "command": " ".join(cmd), "wall_s": wall,
            "notes": [scope, f"DeepSpeed {result['precision']} engine, torch AdamW; ms = mean step over the "
                      f"{result['steps']} timed steps (rank 0); tokens/s global; MFU over world size x peak; peak MiB"
                      " = rank 0's torch.cuda.max_memory_allocated over the timed steps"]}


def worker(args) -> None:
    """One rank: engine, warm-up, calibration, timed steps; rank 0 writes the result JSON."""
    # torch, deepspeed and the models (~8 s) load in the ranks only: `launch` (the parent) runs without them
    import torch

    from bench.gpu.steps import bert, cached_batch, kd_module
    from kdlib.runtime.process_group import all_reduce_sum, barrier, init_distributed, shutdown
    from kdlib.runtime.speed import count_parameters
    from kdlib.training.deepspeed_engine import EngineConfig, deepspeed_config, initialize

    cuda = torch.cuda.is_available()
    backend, precision = ("nccl", "bf16") if cuda else ("gloo", "fp32")
    place = init_distributed(backend)
    try:
        device = torch.device("cuda", place.local_rank) if cuda else torch.device("cpu")
        spec = STUDENTS[ZERO_STUDENT]
        student = bert(spec, VOCAB, 1, "cpu")  # DeepSpeed moves (and casts) the module itself
        parameters = count_parameters(student)
        engine_cfg = EngineConfig(zero_stage=2, precision=precision, micro_batch=args.batch, dist_backend=backend)
        engine = initialize(kd_module(student, spec.hidden),
                            deepspeed_config(engine_cfg, place.world_size, total_steps=10**6),
                            engine_cfg.optim, num_layers=spec.layers)
        batch = cached_batch(args.batch, spec.hidden, device, seed=place.rank)
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def step():
            total, _ = engine(batch)
            engine.backward(total)
            engine.step()

        for _ in range(max(1, args.warmup)):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        wanted = torch.tensor([args.seconds / max((time.perf_counter() - start) / 2, 1e-4)], dtype=torch.float64,
                              device=device)
        all_reduce_sum(wanted)  # every rank gets the same sum, hence the same step count
        steps = max(3, int(float(wanted) / place.world_size))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        barrier()
        elapsed = time.perf_counter() - start
        if place.rank == 0:
            atomic_write_text(args.out, json.dumps({
                "world_size": place.world_size, "backend": backend, "precision": precision, "zero_stage": 2,
                "steps": steps, "seconds": elapsed, "ms": 1000 * elapsed / steps, "parameters": parameters,
                "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("bench.gpu.zero", __doc__, config=False)
    parser.add_argument("--batch", type=int, required=True, help="rows of 128 tokens per GPU per step")
    parser.add_argument("--seconds", type=float, required=True, help="timed seconds")
    parser.add_argument("--warmup", type=int, required=True, help="untimed steps first")
    parser.add_argument("--out", required=True, help="where rank 0 writes its JSON result")
    worker(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
