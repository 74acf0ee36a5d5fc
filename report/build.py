"""Build the report folder: read every stage's outputs, draw the PNGs, write numbers.json, then report.md (last).

Nothing is trained or measured here: the report only reads what the stages wrote, so it can be rebuilt any time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from kdlib.config import read_config_file
from kdlib.errors import ReaderError
from kdlib.runtime.io import atomic_target, atomic_write_text
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.outputs import check_output_folder, output_lock
from kdlib.runtime.plots import pyplot
from report.config import ReportConfig
from report.numbers import NUMBERS_FILE, Numbers, verify
from report.scaling import scaling_section
from report.sections import (files_section, first_paths, general_section, loss_section, speed_section, targets_section,
                             task_section)

NOT_OBJECTIVES = {"kind", "step", "loss", "lr", "tokens", "tokens_per_s", "epoch", "layer_in_training"}

STAGE = "python -m report"


def _save(fig, path: Path) -> str:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
    return path.name


def _curve(ax, records: list[dict], key: str, **style) -> None:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if points:
        ax.plot(*zip(*points), **style)


def teacher_curve(losses: list[float], path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="masked-LM cross-entropy", yscale="log",
           title="teacher preparation: the masked-LM head over the frozen encoder")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def general_curve(records: list[dict], path: Path) -> str:
    plt = pyplot()
    keys = ["loss"] + sorted({k for r in records for k in r} - NOT_OBJECTIVES)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        _curve(ax, records, key, label=key, linewidth=1.6 if key == "loss" else 0.9)
    ax.set(xlabel="optimizer step", ylabel="loss (weighted sum and each objective)",
           title="general distillation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def task_curves(runs: list[dict], path: Path) -> str:
    """One panel per trained arm, one line per fold (and seed)."""
    plt = pyplot()
    arms = [a for a in ("teacher", "kd", "baseline") if any(r["arm"] == a for r in runs)]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for r in (r for r in runs if r["arm"] == arm):
            label = f"fold {r['fold']}" + (f" seed {r['seed']}" if arm != "teacher" else "")
            _curve(ax, read_metrics(Path(r["folder"]) / "metrics.jsonl"), "loss", label=label, linewidth=0.9)
        ax.set(xlabel="optimizer step", ylabel="training loss", title=f"task distillation: {arm}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def speed_plot(n: Numbers, evaluation: str, deploy: str, path: Path) -> str:
    plt = pyplot()
    names, speeds, notes = [], [], []
    for name, record in n.value(evaluation, "models").items():
        names.append(name)
        speeds.append(record["metrics"]["sequences_per_s"] or 0.0)
        notes.append(f"{record['metrics']['parameters'] / 1e6:.1f}M parameters")
    for form in ("transformers fp32", "onnxruntime int8"):
        c = n.value(deploy, "candidates", form)
        names.append(f"task student, {form}")
        speeds.append(c["throughput_seq_per_s"])
        notes.append(f"{c['size_bytes'] / 1e6:.1f} MB on disk")
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    bars = ax.barh(range(len(names)), speeds, color=["C0"] * (len(names) - 2) + ["C1", "C2"])
    ax.bar_label(bars, labels=[f"{s:.1f} seq/s, {t}" for s, t in zip(speeds, notes)], fontsize=8, padding=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(speeds) * 1.6)
    ax.set(xlabel="sequences/s on this CPU (batch 32 x 128 tokens)", title="speed and size")
    fig.tight_layout()
    return _save(fig, path)


def steps_plot(steps: dict, path: Path) -> str:
    plt = pyplot()
    names = list(steps)
    minutes = [steps[s]["work_seconds"] / 60 for s in names]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    bars = ax.barh(range(len(names)), minutes)
    ax.bar_label(bars, labels=[f"{m:.1f} min" for m in minutes], fontsize=8, padding=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(minutes + [0.1]) * 1.25)
    ax.set(xlabel="minutes on this machine", title="time per demo step")
    fig.tight_layout()
    return _save(fig, path)


def _copy(source: str, target: Path) -> str:
    if not Path(source).is_file():
        raise ReaderError(f"{source}: missing; the report copies it")
    with atomic_target(target) as tmp:
        shutil.copyfile(source, tmp)
    return target.name


def _found_claim(out: Path) -> Optional[str]:
    """"report" when `out` holds a report this stage wrote (a numbers.json of Shown entries), else None."""
    try:
        entries = json.loads((out / NUMBERS_FILE).read_text(encoding="utf-8"))
        return "report" if isinstance(entries, list) and all(
            isinstance(e, dict) and {"shown", "terms", "fmt"} <= set(e) for e in entries) else None
    except (OSError, ValueError):
        return None


def build_report(cfg: ReportConfig, source: str) -> Path:
    """Write cfg.output_dir/{report.md, numbers.json, *.png}; report.md last. Returns its path.

    The folder must be absent, empty or an earlier report (which is rewritten): a folder of anyone else's files
    is refused before any input is read, and one writer at a time holds its lock."""
    out = Path(cfg.output_dir)
    check_output_folder(out, stage=STAGE, found_claim=_found_claim(out) if out.is_dir() else None, claim="report",
                        overwrite=False)
    with output_lock(out, STAGE):
        return _build(cfg, source, out)


def _build(cfg: ReportConfig, source: str, out: Path) -> Path:
    configs = {name: getattr(cfg.configs, name) for name in vars(cfg.configs)}
    outputs = {}
    for name, file in configs.items():
        try:
            outputs[name] = Path(read_config_file(file)["output_dir"])
        except (FileNotFoundError, KeyError):
            raise ReaderError(f"{source}: configs.{name}: {file} is missing or has no output_dir") from None
    p = first_paths(cfg, outputs)
    out.mkdir(parents=True, exist_ok=True)
    n = Numbers()
    runs = n.value(p.task_report, "runs")
    curves = {"Teacher preparation": teacher_curve(n.value(p.teacher_report, "train_loss"), out / "loss_teacher.png"),
              "General distillation": general_curve(read_metrics(p.general_metrics), out / "loss_general.png"),
              "Task distillation (teacher, KD student, baseline)": task_curves(runs, out / "loss_task.png")}
    pngs = [_copy(p.evaluation_png, out / "general_evaluation.png"), _copy(p.task_png, out / "task_metrics.png"),
            speed_plot(n, p.evaluation, p.deploy, out / "speed_size.png"),
            steps_plot(n.value(p.steps), out / "steps.png"), *curves.values()]
    lines = ["# Distillation demo: corpus to general student to task student to int8", "",
             "Built by `python -m report` from the files each stage wrote; every number below is read from one of "
             "them (`numbers.json` names the file and key of each).", ""]
    lines += targets_section(n, p, cfg, source)
    lines += general_section(n, p, cfg)
    lines += task_section(n, p, cfg)
    lines += speed_section(n, p, cfg)
    lines += loss_section(curves)
    lines += scaling_section(n, p.steps, configs)
    lines += files_section(["report.md", "numbers.json", *pngs])
    n.save(out)
    atomic_write_text(out / "report.md", "\n".join(lines))
    problems = verify(out)
    if problems:
        raise ReaderError(f"{out}/report.md does not match its sources: " + "; ".join(problems[:5]))
    return out / "report.md"
