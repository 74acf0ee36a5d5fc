"""Top-k vs sampled vs top-k + sampled tail teacher caches at equal bytes per position, on the demo teacher.

    python -m bench.cache_fidelity [--budgets 50,100,150] [--sequences 32] [--students trio|all|none]
                                   [--steps 60] [--train-rows 512] [--seeds 0] [--out runs/bench/cache_fidelity]

Held-out text: the first `--sequences` packed, masked rows of the demo corpus after the documents the
demo transfer set was built from (evaluate.heldout, as `python -m evaluate` scores), run through the
demo teacher (runs/demo/teacher_mlm: `python -m teacher --config configs/demo_teacher.yaml`).
Per representation and budget, k (top-k), N (draws) or both (top-k + tail: the top-k takes about half
the budget, the draws the rest) are chosen by measuring the bytes they take: the cached columns of the
first 16 held-out rows, written by the real shard writer (zstd) and read from the Parquet metadata;
compressed top-k encodings (topk_encoding, kdlib/cache/codec.py) are extra rows. On every
held-out position, through the real reader: KL(p || reconstruction) (top-k: the leftover mass spread
evenly, as the manifest's fidelity; a sampled estimate holds all the mass on the drawn ids, so it is
infinite), the total variation, and at a reference student s = 0.5 * teacher logits the cosine and
the bias norm ||E[gradient] - dense gradient|| of the estimated KD gradient (top-k: kd_topk's
renormalised teacher, whose gradient is deterministic, so bias = error) and this draw's error norm.

Then small students (3 layers, the teacher's every other layer, `python -m launch local --nproc 2`)
train for equal steps from each representation (kd_topk / kd_sparse) built over the first
`--train-rows` rows of the demo transfer set, plus a reference on the online teacher's dense
distribution (kd_kl); `python -m evaluate`'s held-out masked top-1 agreement and masked KL score
them. `--students trio` (default) trains the ~100 B/position representations only (all 9 take over
the ~20 minutes this bench aims at on 2 cores); `all` trains all 9. Prints markdown tables (also
OUT/cache_fidelity.md and .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from bench.local_runs import REPO, launch_local
from data_pipeline.rows import stable_hash
from evaluate.config import EvaluateConfig
from evaluate.heldout import select_heldout
from evaluate.run import evaluate_models, prepare_reference
from kdlib.cache import (FORMAT_VERSION, Manifest, TransferSet, row_schema, rows_to_table, shard_name,
                         write_manifest, write_shard)
from kdlib.cache.sampling import dense_weights, estimate_fidelity, expected_weights
from kdlib.cache.shards import column_bytes_per_position
from kdlib.config import from_dict
from kdlib.runtime.fingerprints import model_fingerprint, tokenizer_fingerprint
from kdlib.runtime.models import ModelConfig, load_model, load_tokenizer
from kdlib.schemas import TeacherOutputsConfig
from kdlib.teachers.outputs import rows_from_outputs, teacher_forward
from kdlib.text.padding import pad_sequences

DEMO_PIPELINE = REPO / "configs/demo_pipeline.yaml"
BASE_COLUMNS = {"id", "source_id", "augmentation", "input_ids", "mlm_positions", "mlm_labels"}


def encodings() -> list[Optional[str]]:
    """None (the plain fp16 top-k), plus any compressed top-k encodings TeacherOutputsConfig offers."""
    fields = {f.name: f for f in dataclasses.fields(TeacherOutputsConfig)}
    if "topk_encoding" not in fields:
        return [None]
    hint = typing.get_type_hints(TeacherOutputsConfig)["topk_encoding"]
    default = fields["topk_encoding"].default
    return [None] + [e for e in typing.get_args(hint) if e != default]


@dataclass(frozen=True)
class Rep:
    """One cache representation: top-k (k), sampled (n), top-k + tail (k and n), or the online dense teacher."""

    kind: str  # topk, sampled, tail, dense
    k: int = 0
    n: int = 0
    encoding: Optional[str] = None  # a compressed top-k encoding (the other option of TeacherOutputsConfig)

    @property
    def name(self) -> str:
        enc = f" ({self.encoding})" if self.encoding else ""
        return {"topk": f"top-{self.k}{enc}", "sampled": f"sampled N={self.n}{enc}", "dense": "dense (online teacher)",
                "tail": f"top-{self.k} + tail N={self.n}{enc}"}[self.kind]

    def outputs(self):
        extra = {"topk_encoding": self.encoding} if self.encoding else {}
        return TeacherOutputsConfig(top_k=self.k, sampled_tokens=self.n, **extra)


# ---------------------------------------------------------------- teacher, rows, transfer sets


def demo_paths() -> tuple[Path, Path]:
    cfg = yaml.safe_load(DEMO_PIPELINE.read_text())
    teacher, transfer = REPO / cfg["teacher"]["path"], REPO / cfg["output_dir"]
    if not (teacher / "config.json").is_file():
        raise SystemExit(f"bench.cache_fidelity: no demo teacher at {teacher} (configs/demo_pipeline.yaml's teacher): "
                         "prepare it with `python -m teacher --config configs/demo_teacher.yaml` (or `make demo`)")
    if not (transfer / "manifest.json").is_file():
        raise SystemExit(f"bench.cache_fidelity: no demo transfer set at {transfer}: its corpus fixes the held-out "
                         "text and its rows train the students; build it with `python -m data_pipeline --config "
                         "configs/demo_pipeline.yaml`")
    return teacher, transfer


def heldout_rows(transfer: Path, tokenizer, sequences: int) -> list[dict]:
    held = select_heldout(transfer, tokenizer, max_length=128, max_sequences=sequences, min_length=16,
                          mask_prob=0.15, seed=0)
    return [{"id": f"heldout-{r:05d}", "source_id": "heldout", "augmentation": "original",
             "input_ids": np.asarray(ids, dtype=np.int32), "mlm_positions": np.asarray(pos, dtype=np.int32),
             "mlm_labels": np.asarray(orig, dtype=np.int32)[pos]}
            for r, (ids, pos, orig) in enumerate(zip(held.masked_ids, held.positions, held.input_ids))]


class Teacher:
    """The frozen demo teacher, its logits over some rows computed once (batches of 8), kept in float32."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.model = load_model(ModelConfig(path=str(folder), task="masked_lm")).eval()
        self.tokenizer = load_tokenizer(str(folder))
        self.vocab = self.model.config.vocab_size

    def forward(self, rows: list[dict], batch: int = 8):
        """[(rows, ids, mask, raw)] per batch of rows."""
        out = []
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            ids, mask = pad_sequences([r["input_ids"] for r in part], self.tokenizer.pad_token_id or 0)
            out.append((part, ids, mask, teacher_forward(self.model, ids, mask, Rep("topk", 1).outputs())))
        return out


def cache_rows(batches, rep: Rep, vocab: int, seed: int = 0) -> list[dict]:
    """The rows the pipeline would store for `rep` (draws seeded as data_pipeline seeds them)."""
    rows = []
    for part, ids, mask, raw in batches:
        seeds = [stable_hash(f"{seed}:samples:{r['id']}") for r in part] if rep.n else None
        values = rows_from_outputs(raw, ids, mask, rep.outputs(), vocab, seeds=seeds)
        rows += [dict(r, **v) for r, v in zip(part, values)]
    return rows


def cache_rows_many(teacher: "Teacher", rows: list[dict], reps: list[Rep]) -> dict[Rep, list[dict]]:
    """cache_rows for several representations, one teacher batch at a time (a set's logits do not fit in memory)."""
    out: dict[Rep, list[dict]] = {rep: [] for rep in reps}
    for start in range(0, len(rows), 8):
        batch = teacher.forward(rows[start:start + 8])
        for rep in reps:
            out[rep] += cache_rows(batch, rep, teacher.vocab)
    return out


def write_set(directory: Path, rows: list[dict], rep: Rep, teacher: Teacher, shards: int = 1):
    """A transfer set in the pipeline's format (real writer, manifest with the teacher's fingerprints)."""
    shutil.rmtree(directory, ignore_errors=True)
    extra = {"topk_encoding": rep.encoding} if rep.encoding else {}
    schema = row_schema(vocab_size=teacher.vocab, top_k=rep.k, sampled_tokens=rep.n, has_mlm=True, **extra)
    per = -(-len(rows) // shards)
    infos = [write_shard(directory, shard_name(s, shards), rows_to_table(rows[s * per:(s + 1) * per], schema))
             for s in range(shards)]
    c = teacher.model.config
    write_manifest(directory, Manifest(
        format_version=FORMAT_VERSION,
        teacher={"ref": str(teacher.folder), "fingerprint": model_fingerprint(teacher.folder), "task": "masked_lm",
                 "vocab_size": c.vocab_size, "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size},
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.folder), config={"bench": "cache_fidelity"},
        config_hash="bench", cached={"top_k": rep.k, "sampled_tokens": rep.n, "mlm": True, **extra},
        dtypes={}, max_length=128, shards=infos,
        totals={"rows": len(rows), "tokens": sum(i.tokens for i in infos), "bytes": sum(i.bytes for i in infos)},
        fidelity={}, created="bench"))
    return infos


def cached_bytes(directory: Path, infos) -> float:
    """Compressed bytes per real position of the teacher-output columns (not ids, text or masks)."""
    per = column_bytes_per_position(directory, infos, sum(i.tokens for i in infos))
    return sum(v for name, v in per.items() if name not in BASE_COLUMNS)


# ---------------------------------------------------------------- choosing k / N per budget


class Sizer:
    """Measured bytes per position of a representation over the held-out rows (memoised)."""

    def __init__(self, batches, teacher: Teacher, work: Path):
        self.batches, self.teacher, self.work, self.memo = batches, teacher, work, {}

    def __call__(self, rep: Rep) -> float:
        if rep not in self.memo:
            folder = self.work / "sizing"
            infos = write_set(folder, cache_rows(self.batches, rep, self.teacher.vocab), rep, self.teacher)
            self.memo[rep] = cached_bytes(folder, infos)
        return self.memo[rep]


def closest(size, make, lo: int, hi: int, target: float) -> Rep:
    """The representation make(x), lo <= x <= hi, whose measured size (increasing in x, nearly linear) is nearest
    the target: secant steps on the measured sizes, then the neighbours of the best point."""
    def f(x: int) -> float:
        return size(make(x))

    a, b = lo, min(hi, max(lo + 1, 16))
    for _ in range(8):
        fa, fb = f(a), f(b)
        if fb == fa:
            break
        x = int(round(b + (target - fb) * (b - a) / (fb - fa)))
        x = min(hi, max(lo, x))
        if x in (a, b):
            break
        a, b = b, x
    best = min(range(lo, hi + 1), key=lambda x: abs(f(x) - target) if make(x) in size.memo else float("inf"))
    for x in (best - 1, best + 1):
        if lo <= x <= hi:
            f(x)
    return min((make(x) for x in (best - 1, best, best + 1) if lo <= x <= hi), key=lambda r: abs(size(r) - target))


def choose(size, budgets: list[float], vocab: int) -> list[tuple[float, Rep]]:
    chosen = []
    for budget in budgets:
        for enc in encodings():
            chosen.append((budget, closest(size, lambda k: Rep("topk", k=k, encoding=enc), 1, min(vocab, 512), budget)))
        for enc in encodings():  # (q8 also delta-codes the sampled ids)
            chosen.append((budget, closest(size, lambda n: Rep("sampled", n=n, encoding=enc), 1, 255, budget)))
        for enc in encodings():
            half = closest(size, lambda k: Rep("topk", k=k, encoding=enc), 1, min(vocab, 512), budget / 2)
            chosen.append((budget, closest(size, lambda n: Rep("tail", k=half.k, n=n, encoding=enc), 1, 255, budget)))
    return chosen


# ---------------------------------------------------------------- fidelity through the reader


def fidelity(folder: Path, batches, chunk: int = 512) -> dict:
    """Means over every real held-out position (module docstring)."""
    ts = TransferSet(folder)
    batch = ts.batch(range(len(ts)))
    real = batch["attention_mask"].bool()
    logits = torch.cat([raw["logits"][mask.bool()] for _, _, mask, raw in batches])  # global row order = rows'
    keys = ("sparse_ids", "sparse_weights") if "sparse_ids" in batch else ("topk_ids", "topk_logits", "teacher_lse")
    columns = [batch[key][real] for key in keys]  # (P, ...) at the real positions, once
    sums, count = {}, 0
    P, V = logits.shape
    for start in range(0, P, chunk):
        z = logits[start:start + chunk]
        part = [c[start:start + chunk] for c in columns]
        if "sparse_ids" in batch:
            ids, w = part
            estimate = dense_weights(ids, w, V)
            figures = estimate_fidelity(z, estimate, estimate, expected_weights(z, ids, w, ts.top_k))
        else:  # top-k: leftover spread evenly to reconstruct; kd_topk's renormalised teacher for the gradient
            ids, zk, lse = part[0], part[1].double(), part[2].double()
            p_k = torch.exp(zk - lse[:, None])
            fill = ((1 - p_k.sum(-1)).clamp(min=0) / (V - ids.shape[-1])).unsqueeze(-1)
            reconstruction = fill.expand(-1, V).clone().scatter_(-1, ids, p_k)
            renorm = torch.zeros(len(ids), V, dtype=torch.float64).scatter_(-1, ids, torch.softmax(zk, -1))
            figures = estimate_fidelity(z, reconstruction, renorm, renorm)
        for name, value in figures.items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
        count += len(z)
    return {name: value / count for name, value in sums.items()} | {"positions": count}


# ---------------------------------------------------------------- students


def train_student(name: str, folder: Path, rep: Rep, teacher: Path, steps: int, out: Path,
                  seed: int = 0) -> tuple[Path, float]:
    run = out / "students" / (name if seed == 0 else f"{name}-seed{seed}")
    export = run / "export"
    if (export / "model.safetensors").is_file():
        return export, 0.0
    objective = {"topk": "kd_topk", "sampled": "kd_sparse", "tail": "kd_sparse", "dense": "kd_kl"}[rep.kind]
    cfg = {"teacher": {"path": str(teacher), "task": "masked_lm"}, "transfer_set": str(folder), "output_dir": str(run),
           "student": {"num_layers": 3, "init": "every_other"}, "online_teacher": rep.kind == "dense",
           "objectives": [{"name": objective, "weight": 1.0}],
           "engine": {"zero_stage": 2, "precision": "fp32", "micro_batch": 8, "grad_accum": 1,
                      "gradient_clipping": 1.0, "optim": {"learning_rate": 5e-4, "warmup_steps": 10,
                                                          "weight_decay": 0.01}},
           "steps": steps, "seed": seed, "threads": 1, "eval_rows": 32, "eval_every": steps,
           "checkpoint_every": steps, "keep_checkpoints": 1, "progress_bar": False}
    run.mkdir(parents=True, exist_ok=True)
    config = out / "configs" / f"{run.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return export, launch_local(["--config", str(config)], out / "logs" / f"{run.name}.log", name)


def score(models: dict, transfer: Path, out: Path) -> dict:
    """evaluate's held-out masked-LM metrics (masked top-1 agreement with the teacher, masked KL)."""
    cfg = from_dict(EvaluateConfig, {
        "models": models, "teacher": "teacher", "transfer_set": str(transfer),
        "output_dir": str(out / "evaluation"), "threads": 2, "progress_bar": False, "overwrite": True,
        "heldout": {"max_sequences": 128}, "speed": {"enabled": False}, "word_similarity": False})
    return evaluate_models(cfg, reference=prepare_reference(cfg))


# ---------------------------------------------------------------- tables


def fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return "∞" if x == float("inf") else f"{x:.{digits}f}"


def fidelity_table(results: list[dict]) -> str:
    rows = ["| budget | representation | k | N | bytes/position | KL(p ‖ p̂) | TV | gradient cosine | "
            "gradient bias norm | gradient error norm |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["fidelity"]
        rows.append(f"| ~{r['budget']:.0f} | {r['name']} | {r['k'] or '—'} | {r['n'] or '—'} | {r['bytes']:.1f} | "
                    f"{fmt(f['kl'])} | {fmt(f['tv'])} | {fmt(f['grad_cosine'])} | {fmt(f['grad_bias_norm'], 5)} | "
                    f"{fmt(f['grad_error_norm'], 5)} |")
    return "\n".join(rows)


def _mean_std(values: list[float]) -> str:
    mean = float(np.mean(values))
    return f"{mean:.4f} ± {float(np.std(values, ddof=1)):.4f}" if len(values) > 1 else f"{mean:.4f}"


def student_table(scored: dict, trained: list[dict]) -> str:
    """One row per representation: mean ± sample std over its seeds."""
    models = scored["models"]
    rows = ["| student (equal steps) | seeds | bytes/position | held-out masked top-1 agreement | held-out masked KL ↓ | "
            "train s (each) |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(t["name"] for t in trained):
        runs = [t for t in trained if t["name"] == name]
        metrics = [models[t["key"]]["metrics"] for t in runs]
        rows.append(f"| {name} | {len(runs)} | {fmt(runs[0]['bytes'], 1) if runs[0]['bytes'] else '—'} | "
                    f"{_mean_std([m['masked_top1_agreement'] for m in metrics])} | "
                    f"{_mean_std([m['masked_kl'] for m in metrics])} | "
                    f"{np.mean([t['seconds'] for t in runs]):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="50,100,150")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--students", choices=("trio", "all", "none"), default="trio")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-rows", type=int, default=512)
    parser.add_argument("--seeds", default="0", help="student seeds (data order, dropout), e.g. 0,1,2: mean ± std")
    parser.add_argument("--out", default="runs/bench/cache_fidelity")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.time()
    teacher_dir, transfer = demo_paths()
    teacher = Teacher(teacher_dir)
    held = teacher.forward(heldout_rows(transfer, teacher.tokenizer, args.sequences))
    work = Path(tempfile.mkdtemp(prefix="cache-fidelity-", dir=out))
    size = Sizer(held[:2], teacher, work)  # bytes measured on the first 16 sequences (2048 positions)
    results = []
    for budget, rep in choose(size, budgets, teacher.vocab):
        folder = work / "fidelity"
        write_set(folder, cache_rows(held, rep, teacher.vocab), rep, teacher)
        results.append({"budget": budget, "name": rep.name, "kind": rep.kind, "k": rep.k, "n": rep.n,
                        "encoding": rep.encoding, "bytes": size(rep), "fidelity": fidelity(folder, held)})
        print(f"[bench.cache_fidelity] ~{budget:.0f} B: {rep.name}: {size(rep):.1f} B/position, "
              f"{json.dumps(results[-1]['fidelity'])} ({time.time() - t0:.0f} s)", flush=True)
    positions = results[0]["fidelity"]["positions"]
    text = (f"Held-out positions: {positions} (every real position of {args.sequences} masked held-out sequences), "
            f"demo teacher {teacher_dir.relative_to(REPO)}; bytes/position: the cached columns of the first 16 of "
            f"them, written by the shard writer (zstd); reference student s = 0.5 * teacher logits.\n\n"
            + fidelity_table(results) + "\n")
    print(text, flush=True)
    trained = []
    if args.students != "none":
        middle = sorted(budgets, key=lambda b: abs(b - 100))[0]
        picks = [r for r in results if (args.students == "all" or r["budget"] == middle) and not r["encoding"]]
        reps = [Rep(r["kind"], k=r["k"], n=r["n"]) for r in picks]
        built = cache_rows_many(teacher, _training_rows(transfer, args.train_rows), reps)
        print(f"[bench.cache_fidelity] training sets cached ({time.time() - t0:.0f} s)", flush=True)
        seeds = [int(x) for x in args.seeds.split(",")]
        for r, rep in zip(picks, reps):
            key = f"{rep.kind}-k{rep.k}-n{rep.n}"
            folder = out / "sets" / key
            write_set(folder, built.pop(rep), rep, teacher)
            for seed in seeds:
                export, seconds = train_student(key, folder, rep, teacher_dir, args.steps, out, seed)
                trained.append({"key": f"{key}-seed{seed}", "name": f"{r['name']} @ ~{r['budget']:.0f} B",
                                "bytes": r["bytes"], "export": str(export), "seconds": seconds})
                print(f"[bench.cache_fidelity] trained {trained[-1]['name']}, seed {seed} ({seconds:.0f} s)", flush=True)
        for seed in seeds:
            export, seconds = train_student("dense", folder, Rep("dense"), teacher_dir, args.steps, out, seed)
            trained.append({"key": f"dense-seed{seed}", "name": "dense (online teacher, kd_kl)", "bytes": None,
                            "export": str(export), "seconds": seconds})
        scored = score({"teacher": str(teacher_dir), **{t["key"]: t["export"] for t in trained}}, transfer, out)
        note = ("all 9 representations" if args.students == "all" else
                f"the ~{middle:.0f} B/position trio only (all 9 do not fit the ~20 minutes this bench aims at on "
                "2 cores; --students all trains them)")
        text += (f"\nStudents: 3 layers from the teacher's every other layer, {args.steps} steps x 16 sequences x 128 "
                 f"tokens, seeds {args.seeds} (mean ± sample std; a reused export reports 0 s), "
                 f"lr 5e-4, from {args.train_rows} rows of {transfer.relative_to(REPO)} (kd_topk / kd_sparse / "
                 f"kd_kl on the online teacher); {note}. Held-out: python -m evaluate's masked metrics on "
                 f"{scored['settings']['heldout'].get('max_sequences')} held-out sequences.\n\n"
                 + student_table(scored, trained) + "\n")
        print(text[text.index("\nStudents:"):], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    text += f"\nWall time {time.time() - t0:.0f} s.\n"
    (out / "cache_fidelity.md").write_text(text)
    (out / "cache_fidelity.json").write_text(json.dumps({"fidelity": results, "students": trained}, indent=1,
                                                        default=float))
    print(f"Wall time {time.time() - t0:.0f} s.")


def _training_rows(transfer: Path, count: int) -> list[dict]:
    """The first rows of the demo transfer set (their masked ids and MLM targets), cached again per representation."""
    ts = TransferSet(transfer, verify="lazy",
                     columns=["id", "source_id", "augmentation", "input_ids", "mlm_positions", "mlm_labels"])
    return [{k: (np.asarray(v) if k in ("input_ids", "mlm_positions", "mlm_labels") else v)
             for k, v in ts.row(i).items()} for i in range(min(count, len(ts)))]


if __name__ == "__main__":
    main()
