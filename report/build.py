"""Build the report folder: read every stage's outputs, draw the PNGs, write numbers.json, then report.md (last).

Nothing is trained or measured here: the report only reads what the stages wrote, so it can be rebuilt any time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kdlib.config import read_config_file
from kdlib.errors import ConfigError, ReaderError, fail_field
from kdlib.runtime.io import atomic_target, atomic_write_text
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.outputs import check_output_folder, output_lock
from kdlib.runtime.plots import pyplot
from report.config import ReportConfig
from report.numbers import NUMBERS_FILE, Numbers, verify
from report.scaling import scaling_section
from report.sections import (Paths, files_section, first_paths, general_section, loss_section, speed_section,
                             targets_section, task_section)

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


def task_curves(runs: list[dict], records: dict[str, list[dict]], path: Path) -> str:
    """One panel per trained arm, one line per fold (and seed); `records`: each run folder's training records."""
    plt = pyplot()
    arms = [a for a in ("teacher", "kd", "baseline") if any(r["arm"] == a for r in runs)]
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for r in (r for r in runs if r["arm"] == arm):
            label = f"fold {r['fold']}" + (f" seed {r['seed']}" if arm != "teacher" else "")
            _curve(ax, records[r["folder"]], "loss", label=label, linewidth=0.9)
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


@dataclass
class Inputs:
    """Everything the report reads, read before it writes anything: a bad input leaves no half-written folder
    (which the next run would refuse as not its own)."""

    n: Numbers  # holds every JSON file it read
    paths: Paths
    configs: dict[str, str]  # stage -> its config file
    general: list[dict]  # general distillation's training records
    task_runs: dict[str, list[dict]]  # each task run folder's training records


def _named(source: str, field: str, read: Callable[[], Any]) -> Any:
    """`read()`, a file it cannot read named with the report config's field that leads to it."""
    try:
        return read()
    except (ConfigError, ReaderError) as err:
        fail_field(source, field, str(err))


def _output_dir(source: str, name: str, file: str) -> Path:
    data = _named(source, f"configs.{name}", lambda: read_config_file(file))
    if not isinstance(data.get("output_dir"), str) or not data["output_dir"]:
        fail_field(source, f"configs.{name}", f"{file} has no output_dir (the folder the report reads {name}'s "
                   "results from)")
    return Path(data["output_dir"])


def _file(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise ReaderError(f"{path}: missing; the report {what}")
    return path


def read_inputs(cfg: ReportConfig, source: str) -> Inputs:
    """Every stage config, then every file the report reads through them; a problem is named with the field."""
    configs = {name: getattr(cfg.configs, name) for name in vars(cfg.configs)}
    p = first_paths(cfg, {name: _output_dir(source, name, file) for name, file in configs.items()})
    n = Numbers()
    for field, file in (("steps", p.steps), ("configs.teacher", p.teacher_report), ("configs.evaluate", p.evaluation),
                        ("configs.finetune", p.task_report), ("configs.finetune", p.deploy)):
        _named(source, field, lambda: n.value(file))
    _named(source, "configs.evaluate", lambda: _file(p.evaluation_png, "copies it"))
    _named(source, "configs.finetune", lambda: _file(p.task_png, "copies it"))
    general = _named(source, "configs.pretrain",
                     lambda: read_metrics(_file(p.general_metrics, "plots general distillation's loss from it")))
    runs = _named(source, "configs.finetune", lambda: n.value(p.task_report, "runs"))
    task_runs = {r["folder"]: _named(source, "configs.finetune",
                                     lambda: read_metrics(Path(r["folder"]) / "metrics.jsonl")) for r in runs}
    return Inputs(n, p, configs, general, task_runs)


CURVES = {"Teacher preparation": "loss_teacher.png", "General distillation": "loss_general.png",
          "Task distillation (teacher, KD student, baseline)": "loss_task.png"}  # section title -> PNG
PNGS = ["general_evaluation.png", "task_metrics.png", "speed_size.png", "steps.png", *CURVES.values()]


def build_report(cfg: ReportConfig, source: str) -> Path:
    """Write cfg.output_dir/{report.md, numbers.json, *.png}; report.md last. Returns its path.

    The folder must be absent, empty or an earlier report (which is rewritten): a folder of anyone else's files
    is refused, and every input is read and every section composed, before anything is written; one writer at a
    time holds its lock."""
    out = Path(cfg.output_dir)
    check_output_folder(out, stage=STAGE, found_claim=_found_claim(out) if out.is_dir() else None, claim="report",
                        overwrite=False)
    inputs = read_inputs(cfg, source)
    lines = report_lines(cfg, source, inputs)
    with output_lock(out, STAGE):
        return _write(inputs, lines, out)


def report_lines(cfg: ReportConfig, source: str, inputs: Inputs) -> list[str]:
    """report.md's lines; every number shown is recorded in inputs.n."""
    n, p = inputs.n, inputs.paths
    lines = ["# Distillation demo: corpus to general student to task student to int8", "",
             "Built by `python -m report` from the files each stage wrote; every number below is read from one of "
             "them (`numbers.json` names the file and key of each).", ""]
    lines += targets_section(n, p, cfg, source)
    lines += general_section(n, p, cfg)
    lines += task_section(n, p, cfg)
    lines += speed_section(n, p, cfg)
    lines += loss_section(CURVES)
    lines += scaling_section(n, p.steps, inputs.configs)
    lines += files_section(["report.md", "numbers.json", *PNGS])
    return lines


def _write(inputs: Inputs, lines: list[str], out: Path) -> Path:
    n, p = inputs.n, inputs.paths
    out.mkdir(parents=True, exist_ok=True)
    _copy(p.evaluation_png, out / "general_evaluation.png")
    _copy(p.task_png, out / "task_metrics.png")
    speed_plot(n, p.evaluation, p.deploy, out / "speed_size.png")
    steps_plot(n.value(p.steps), out / "steps.png")
    teacher_curve(n.value(p.teacher_report, "train_loss"), out / CURVES["Teacher preparation"])
    general_curve(inputs.general, out / CURVES["General distillation"])
    task_curves(n.value(p.task_report, "runs"), inputs.task_runs,
                out / CURVES["Task distillation (teacher, KD student, baseline)"])
    n.save(out)
    atomic_write_text(out / "report.md", "\n".join(lines))
    problems = verify(out)
    if problems:
        raise ReaderError(f"{out}/report.md does not match its sources: " + "; ".join(problems[:5]))
    return out / "report.md"
