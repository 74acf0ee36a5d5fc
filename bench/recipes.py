"""Every general-distillation recipe on the same budget, scored side by side against the teacher.

`python -m bench.recipes [--recipes distilbert,tinybert,...] [--seeds 0,1,2] [--steps 30]
[--out runs/bench/recipes]` trains each shipped recipe (configs/recipes/<name>.yaml) for the same
steps and batch from the same teacher and transfer set (--teacher, --transfer-set; the recipes' own by
default), once per seed, on `python -m launch local --nproc 2`;
writes the untrained student (every-other teacher layers, the recipes' common starting point) with
`python -m pretrain --export-init`; then scores the teacher, the untrained student and every trained
student with `python -m evaluate`'s API. Prints (and writes to OUT/recipes.md, OUT/recipes.json) a
table of mean ± std over seeds per metric, with "% of teacher". A finished run is not trained again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.local_runs import REPO, env, launch_local
from evaluate.config import EvaluateConfig
from evaluate.run import evaluate_models, prepare_reference
from kdlib.config import from_dict
from kdlib.runtime.plots import finish_bar_chart, pyplot
RECIPES = ["sentence", "pooled", "distilbert", "tinybert", "minilm", "minilmv2", "bert_emd"]


def train(recipe: str, seed: int, steps: int, out: Path, data: tuple[str, ...]) -> tuple[Path, float]:
    """Train one (recipe, seed) unless its export exists; returns (export folder, seconds spent). `data`: the
    --set items naming the teacher and transfer set, so every recipe trains on the data it is scored against."""
    run = out / f"{recipe}-seed{seed}"
    export = run / "export"
    if (export / "model.safetensors").is_file():
        return export, 0.0
    args = ["--config", f"configs/recipes/{recipe}.yaml", "--set", f"seed={seed}", "--set", f"steps={steps}",
            "--set", f"output_dir={run}", "--set", f"eval_every={steps}", "--set", f"checkpoint_every={steps}",
            "--set", "progress_bar=false", *data]
    return export, launch_local(args, out / "logs" / f"{run.name}.log", f"{recipe} seed {seed}")


def export_init(recipe: str, out: Path, data: tuple[str, ...]) -> Path:
    folder = out / "untrained"
    if not (folder / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "pretrain", "--config", f"configs/recipes/{recipe}.yaml",
                        "--export-init", str(folder), *data], cwd=REPO, env=env(), check=True)
    return folder


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = [("simlex999_spearman", "SimLex-999 ρ"), ("wordsim353_spearman", "WordSim-353 ρ"),
           ("pooled_cosine", "pooled cosine"), ("masked_top1_agreement", "masked top-1 agreement"),
           ("masked_kl", "masked KL ↓")]


def score(models: dict, transfer_set: str, out: Path) -> dict:
    """evaluate's metrics for every model; speed is timed once for the teacher and the untrained student
    (every trained student has the untrained student's shape, so its speed is the same by construction)."""

    def config(names: list[str], speed: bool) -> EvaluateConfig:
        return from_dict(EvaluateConfig, {
            "models": {n: models[n] for n in names}, "teacher": "teacher", "transfer_set": transfer_set,
            "output_dir": str(out / "evaluation"), "threads": 2, "progress_bar": False,
            "heldout": {"max_sequences": 128}, "speed": {"enabled": speed, "threads": 2, "repeats": 5}})

    speed_cfg = config(["teacher", "untrained"], True)
    reference = prepare_reference(speed_cfg)
    timed = evaluate_models(speed_cfg, reference=reference)
    result = evaluate_models(config(list(models), False), reference=reference)
    for name in ("teacher", "untrained"):
        result["models"][name]["metrics"]["sequences_per_s"] = timed["models"][name]["metrics"]["sequences_per_s"]
    (out / "recipes_evaluation.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def write_table(scores: dict, recipes: list[str], seeds: list[int], args, out: Path, seconds: dict) -> None:
    """Mean ± std over seeds per recipe and metric, with % of teacher; markdown to stdout and OUT/recipes.md."""
    models = scores["models"]
    teacher = models["teacher"]["metrics"]

    def cell(values: list[float], key: str) -> str:
        m, sd = mean_std(values)
        pct = "" if key == "masked_kl" else f" ({100 * m / teacher[key]:.1f}%)"
        return f"{m:.4f} ± {sd:.4f}{pct}" if len(values) > 1 else f"{m:.4f}{pct}"

    rows, summary = [], {}
    header = "| recipe | " + " | ".join(label for _, label in METRICS) + " | train s / run |"
    rows += [header, "|" + "---|" * (len(METRICS) + 2)]
    for name in ["teacher", "untrained"]:
        rows.append(f"| {name} | " + " | ".join(cell([models[name]["metrics"][k]], k) for k, _ in METRICS) + " | |")
    for recipe in recipes:
        per = {k: [models[f"{recipe}-seed{s}"]["metrics"][k] for s in seeds] for k, _ in METRICS}
        summary[recipe] = {k: mean_std(v) for k, v in per.items()}
        spent = [seconds[(recipe, s)] for s in seeds if seconds[(recipe, s)]]
        took = f" | {statistics.fmean(spent):.0f} |" if spent else " | (trained earlier) |"
        rows.append(f"| {recipe} | " + " | ".join(cell(per[k], k) for k, _ in METRICS) + took)
    speed = {n: models[n]["metrics"]["sequences_per_s"] for n in ("teacher", "untrained")}
    text = "\n".join(rows) + (
        f"\n\nSpeed (batch 32 x 128, 2 threads, best of 5): teacher {speed['teacher']:.1f} sequences/s, 3-layer student "
        f"{speed['untrained']:.1f} ({speed['untrained'] / speed['teacher']:.2f}x). {len(seeds)} seed(s) {seeds}, "
        f"{args.steps} steps x 16 sequences x 128 tokens per recipe, transfer set {args.transfer_set}; "
        f"held-out text: {scores['settings']['heldout']}.\n")
    print(text)
    (out / "recipes.md").write_text(text)
    (out / "recipes.json").write_text(json.dumps({"summary": summary, "speed": speed, "seeds": seeds,
                                                  "steps": args.steps}, indent=1))
    plot(summary, teacher, models["untrained"]["metrics"], out / "recipes.png")


def plot(summary: dict, teacher: dict, untrained: dict, path: Path) -> None:
    """% of teacher per metric (bars: mean over seeds, error bars: std), the untrained student as a line."""
    plt = pyplot()
    keys = [(k, label) for k, label in METRICS if k != "masked_kl"]
    x = np.arange(len(keys))
    width = 0.8 / max(len(summary), 1)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (recipe, stats) in enumerate(summary.items()):
        ax.bar(x + i * width, [100 * stats[k][0] / teacher[k] for k, _ in keys], width,
               yerr=[100 * stats[k][1] / teacher[k] for k, _ in keys], label=recipe, capsize=2)
    for j, (k, _) in enumerate(keys):
        ax.hlines(100 * untrained[k] / teacher[k], j - 0.1, j + 0.9, colors="black", linestyles="dashed",
                  label="untrained" if j == 0 else None)
    ax.set_xticks(x + 0.4 - width / 2, [label for _, label in keys])
    finish_bar_chart(fig, ax, path, ylabel="% of teacher",
                     title="General-distillation recipes, same budget (mean ± std over seeds)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--teacher", default="runs/demo/teacher_mlm")
    parser.add_argument("--transfer-set", default="runs/demo/recipes_transfer_set")
    parser.add_argument("--out", default="runs/bench/recipes")
    args = parser.parse_args(argv)
    recipes, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exports, seconds = {}, {}
    data = ("--set", f"teacher.path={args.teacher}", "--set", f"transfer_set={args.transfer_set}")
    for seed in seeds:  # every recipe's first seed first: an early look at the comparison
        for recipe in recipes:
            exports[(recipe, seed)], seconds[(recipe, seed)] = train(recipe, seed, args.steps, out, data)
            print(f"[bench.recipes] {recipe} seed {seed}: {exports[(recipe, seed)]} "
                  f"({seconds[(recipe, seed)]:.0f} s)", flush=True)
    models = {"teacher": args.teacher, "untrained": str(export_init(recipes[0], out, data))}
    models.update({f"{r}-seed{s}": str(p) for (r, s), p in exports.items()})
    scores = score(models, args.transfer_set, out)
    write_table(scores, recipes, seeds, args, out, seconds)


if __name__ == "__main__":
    main()
