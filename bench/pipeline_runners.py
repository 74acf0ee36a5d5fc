"""The transfer-set pipeline on each runner, side by side in one run, against a bare teacher forward.

    python -m bench.pipeline_runners [--config configs/demo_pipeline.yaml] [--max-documents N]

1. Builds the same transfer set with Beam's DirectRunner (2 processes), then with our Dask runner on a local
   cluster of 1 worker and of 2 workers (1 thread each), each into its own folder under bench/out/, timing each
   end to end (start-up included), and checks that their shard files are byte-identical.
2. Runs the bare teacher forward over exactly the cached sequences (bench.pipeline_throughput's, 1 process).
3. Names the fixed costs a worker pays before its first shard: starting Python with the pipeline's imports,
   and loading the teacher.
4. On paper: worker-hours and workers for a 10B-token teacher pass with the demo teacher and with a 1B-parameter
   teacher, from the measured per-token cost (scaled by forward FLOPs for the 1B one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.pipeline_throughput import bare_forward
from kdlib.cache import TransferSet
from kdlib.runtime.io import sha256_file
from kdlib.runtime.models import ModelConfig, load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "pipeline_runners"
RUNNERS = {
    "DirectRunner, 2 processes": ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    "Dask, 1 worker": ["--runner", "dask", "--local-workers", "1"],
    "Dask, 2 workers": ["--runner", "dask", "--local-workers", "2"],
}
TOKENS_10B = 10e9
BIG_TEACHER_PARAMS = 1e9


def build(config: str, max_documents: int | None, name: str, args: list[str]) -> tuple[Path, float]:
    out = OUT / name.lower().replace(", ", "-").replace(" ", "-")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "data_pipeline", "--config", config, "--set", f"output_dir={out}", *args]
    if max_documents:
        cmd += ["--set", f"corpus.max_documents={max_documents}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted((folder / "shards").iterdir())}


def start_up_seconds() -> float:
    """A fresh interpreter importing what a pipeline worker imports before it can run a task."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import data_pipeline.transforms, data_pipeline.dask_runner"], cwd=ROOT,
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def teacher_load_seconds(teacher: ModelConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    model = load_model(teacher)
    return time.perf_counter() - t0, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_runners", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo_pipeline.yaml")
    parser.add_argument("--max-documents", type=int, default=None)
    args = parser.parse_args()

    walls, folders = {}, {}
    for name, runner_args in RUNNERS.items():
        folders[name], walls[name] = build(args.config, args.max_documents, name, runner_args)
        print(f"built with {name}: {walls[name]:.1f} s", flush=True)
    reference = digests(folders["DirectRunner, 2 processes"])
    identical = all(digests(f) == reference for f in folders.values())

    ts = TransferSet(folders["DirectRunner, 2 processes"])
    m = ts.manifest
    teacher = ModelConfig(path=m.config["teacher"]["path"], task=m.config["teacher"]["task"])
    bare_s, bare_tokens, _ = bare_forward(ts, teacher, m.config["batch_size"], sample_positions=64)
    tokens = m.totals["tokens"]
    assert bare_tokens == tokens, (bare_tokens, tokens)
    start_s = start_up_seconds()
    load_s, params = teacher_load_seconds(teacher)

    print("\n== throughput by runner (same config, same machine, one run)")
    print(f"rows {m.totals['rows']:,}, tokens {tokens:,}, shards {len(m.shards)}; shard files identical on every "
          f"runner: {'yes' if identical else 'NO'}")
    print(f"{'runner':<28}{'seconds':>9}{'tokens/s':>11}{'/ bare':>8}")
    for name, wall in walls.items():
        print(f"{name:<28}{wall:>9.1f}{tokens / wall:>11,.0f}{bare_s / wall:>8.2f}")
    print(f"{'bare teacher forward':<28}{bare_s:>9.1f}{tokens / bare_s:>11,.0f}{1:>8.2f}  (1 process, 2 threads)")
    one, two = walls["Dask, 1 worker"], walls["Dask, 2 workers"]
    print(f"Dask 2 workers / 1 worker: {one / two:.2f}x")

    print("\n== what a worker pays before its first shard")
    print(f"python start-up with the pipeline's imports: {start_s:.1f} s")
    print(f"teacher load ({params / 1e6:.1f}M parameters): {load_s:.2f} s")

    # On paper: the 1-worker Dask run's per-token cost, fixed costs excluded, is one worker's rate.
    per_token = max(one - start_s - load_s, 1e-9) / tokens
    big = per_token * BIG_TEACHER_PARAMS / params  # forward FLOPs ~ 2 x parameters per token, same efficiency
    print("\n== on paper: a 10B-token teacher pass (1 worker = 1 CPU thread here; per-token cost from the "
          "1-worker Dask run)")
    for label, cost in ((f"demo teacher ({params / 1e6:.0f}M)", per_token), ("1B-parameter teacher", big)):
        hours = TOKENS_10B * cost / 3600
        print(f"{label:<26} {1 / cost:>9,.0f} tokens/s per worker, {hours:>12,.0f} worker-hours, "
              f"{hours / 24:>9,.0f} workers for 24 h")
    (ROOT / "bench" / "out" / "pipeline_runners.json").write_text(json.dumps({
        "tokens": tokens, "walls": walls, "bare_seconds": bare_s, "identical": identical, "start_up_seconds": start_s,
        "teacher_load_seconds": load_s, "teacher_parameters": params, "per_token_seconds": per_token}, indent=1))


if __name__ == "__main__":
    main()
