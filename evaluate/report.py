"""evaluation.json, evaluation.md and evaluation.png from one evaluation result (evaluate.run).

"% of teacher" = 100 x model value / teacher value, so the teacher's row reads 100%; the speed column
says "x.xx x teacher" instead (model sequences/s / teacher sequences/s, timed side by side). KL(teacher ||
model) has no percentage: the teacher's own is 0. n/a = not measured or undefined, with the reason listed
under the table. The .md shows each number rounded to the decimals in DECIMALS; evaluation.json holds the
same numbers unrounded (nan as null). Each file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from kdlib.runtime.io import atomic_write_text, json_safe
from kdlib.runtime.plots import finish_bar_chart, pyplot

# (key, column title, decimals of the value, how it relates to the teacher: "percent", "ratio" or None)
METRICS = (
    ("simlex999_spearman", "SimLex-999 ρ", 4, "percent"),
    ("wordsim353_spearman", "WordSim-353 ρ", 4, "percent"),
    ("masked_top1_agreement", "masked top-1 agreement", 4, "percent"),
    ("masked_kl", "masked KL(teacher‖model) ↓", 4, None),
    ("pooled_cosine", "pooled cosine", 4, "percent"),
    ("parameters", "parameters", 0, "percent"),
    ("sequences_per_s", "sequences/s", 1, "ratio"),
)
DECIMALS = {"value": {key: d for key, _, d, _ in METRICS}, "percent_of_teacher": 1, "speedup_vs_teacher": 2}


def percent_of(value: float, teacher: float) -> float:
    """100 x value / teacher; nan when either is undefined or the teacher's is 0."""
    if not (math.isfinite(value) and math.isfinite(teacher)) or teacher == 0:
        return math.nan
    return 100.0 * value / teacher


def relate(metrics: dict[str, dict], teacher: str) -> None:
    """Add "percent_of_teacher" and "speedup_vs_teacher" to every model's record (in place)."""
    reference = metrics[teacher]["metrics"]
    for record in metrics.values():
        values = record["metrics"]
        record["percent_of_teacher"] = {key: percent_of(values[key], reference[key])
                                        for key, _, _, kind in METRICS if kind == "percent"}
        speed, base = values["sequences_per_s"], reference["sequences_per_s"]
        record["speedup_vs_teacher"] = speed / base if math.isfinite(speed) and math.isfinite(base) else math.nan


def _cell(record: dict, key: str, decimals: int, kind) -> str:
    value = record["metrics"][key]
    if not math.isfinite(value):
        return "n/a"
    shown = f"{int(value):,}" if key == "parameters" else f"{value:.{decimals}f}"
    if kind == "percent":
        share = record["percent_of_teacher"][key]
        return f"{shown} ({share:.1f}% of teacher)" if math.isfinite(share) else shown
    if kind == "ratio":
        return f"{shown} ({record['speedup_vs_teacher']:.2f} x teacher)"
    return shown


def markdown(result: dict) -> str:
    teacher, models = result["teacher"], result["models"]
    lines = [f"# Evaluation against the teacher `{teacher}`", "",
             "Each cell: value (% of the teacher's value; the teacher row is 100%). Speed: sequences/s "
             "(x teacher). KL(teacher‖model) is lower-better and 0 for the teacher, so it has no percentage. "
             "n/a: not measured or undefined (reasons below). Values are rounded here; evaluation.json holds "
             "them unrounded.", ""]
    header = ["model"] + [title for _, title, _, _ in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, record in models.items():
        cells = [name] + [_cell(record, key, d, kind) for key, _, d, kind in METRICS]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- {name}: {key}: {why}" for name, record in models.items() for key, why in record["notes"].items()]
    if notes:
        lines += ["", "## n/a", ""] + notes
    s = result["settings"]
    lines += ["", "## Settings", ""]
    h = s.get("heldout")
    if h:
        ids = h["article_ids"]
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        lines.append(f"- Held-out text: {h['sequences']} sequences of at most {h['max_length']} tokens "
                     f"({h['tokens']} tokens, {h['masked_positions']} masked positions at {h['mask_prob']}, seed "
                     f"{h['seed']}) from {h['articles']} {h['corpus']['kind']} documents after the first "
                     f"{h['skipped_documents']} (those of the transfer set {h['transfer_set']}): {shown}.")
    else:
        lines.append("- Held-out text: not evaluated.")
    w = s.get("word_similarity")
    lines.append("- Word similarity: " + (", ".join(f"{k} ({v['pairs']} pairs, {v['file']})" for k, v in w.items())
                                          + f"; {s['pooling']}." if w else "not evaluated."))
    sp = s.get("speed")
    lines.append(f"- Speed: batch {sp['batch_size']} x {sp['length']} tokens, {sp['batches']} batch(es) per pass, "
                 f"{sp['threads']} thread(s), best of {sp['repeats']} interleaved passes after {sp['warmup']} "
                 "warm-up, encoder only (no masked-LM head)." if sp else "- Speed: not measured.")
    lines.append("- Parameters: the encoder as timed (embeddings and layers, plus a pooler where the folder has "
                 "one; no masked-LM head).")
    lines += ["", f"Wall time {result['wall_seconds']:.1f} s.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per model, height = % of teacher (speed: 100 x speed-up)."""
    plt = pyplot()
    keys = [(key, title) for key, title, _, kind in METRICS if kind is not None]
    names = list(result["models"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(keys) * len(names) ** 0.5 + 2), 4.5))
    for i, name in enumerate(names):
        record = result["models"][name]
        heights = [100.0 * record["speedup_vs_teacher"] if key == "sequences_per_s"
                   else record["percent_of_teacher"][key] for key, _ in keys]
        x = np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width
        bars = ax.bar(x, [h if math.isfinite(h) else 0.0 for h in heights], width, label=name)
        ax.bar_label(bars, labels=[f"{h:.0f}" if math.isfinite(h) else "n/a" for h in heights], fontsize=7)
    ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(keys)), [title.replace("masked ", "masked\n") for _, title in keys], fontsize=8)
    finish_bar_chart(fig, ax, path, ylabel="% of teacher", title=f"evaluation against {result['teacher']}")


def write_evaluation(result: dict, output_dir: str | os.PathLike) -> Path:
    """evaluation.png, evaluation.json, then evaluation.md (last: its presence means the set is complete)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(result, output_dir / "evaluation.png")
    atomic_write_text(output_dir / "evaluation.json",
                      json.dumps(json_safe({**result, "display_decimals": DECIMALS}), indent=2, allow_nan=False) + "\n")
    atomic_write_text(output_dir / "evaluation.md", markdown(result))
    return output_dir / "evaluation.md"
