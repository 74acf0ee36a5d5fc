"""The table of bench.task_methods: a row per method, each number read from that method's finetune report.

report.json gives the arms' accuracy and macro-F1 (mean ± std over seeds), % of teacher, the CPU speed-up against
the teacher and the paired difference KD − baseline with its standard error; the training time, which the report
does not hold, is read from each KD run's own log (metrics.jsonl: every optimizer step's tokens and tokens/s).

The multi-teacher config also gets a row for its teachers' ensemble, scored from their saved predictions without
training anything and without a change to the finetune stage: every teacher's predictions.jsonl keeps its logits
per held-out example ("scores"), so the ensemble's probabilities are the mean over teachers of softmax(scores) (at
T = 1, the teachers' own probabilities), its prediction their argmax, scored by kdlib.tasks.metrics like every arm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from finetune.layout import BASELINE, KD, TEACHER, Layout
from finetune.multitask import task_config
from finetune.report import DECIMALS
from finetune.run import PREDICTIONS_FILE
from kdlib.errors import ReaderError
from kdlib.runtime.io import atomic_write_text, json_safe
from kdlib.runtime.jsonl import json_document, json_objects
from kdlib.runtime.metrics import read_metrics
from kdlib.tasks.metrics import percent_of, summarize, task_metrics

MULTITASK_KD = f"multitask-{KD}"  # the multi-task student's arm in each task's report (finetune.multitask)
TASK_OF_MULTITASK = "tweets"  # the task of a multi-task config whose report gives its row (else its first task)
METRICS = ("accuracy", "macro_f1")


def _nan(value) -> float:
    return math.nan if value is None else float(value)  # report.json writes nan as null


def report_of(cfg) -> tuple[Path, str]:
    """(report.json, the arm of the row) of a resolved finetune config: a multi-task config's row is its student
    on the tweets task."""
    if not cfg.tasks:
        return Layout(cfg).report() / "report.json", KD
    names = [t.name for t in cfg.tasks]
    index = names.index(TASK_OF_MULTITASK) if TASK_OF_MULTITASK in names else 0
    return Layout(task_config(cfg, index)).report() / "report.json", MULTITASK_KD


def step_seconds(log: Path) -> float:
    """Seconds of the optimizer steps logged in a run's metrics.jsonl (each record: tokens / tokens_per_s)."""
    steps = [r for r in read_metrics(log) if r.get("kind") == "train" and r.get("tokens_per_s")]
    return math.fsum(r["tokens"] / r["tokens_per_s"] for r in steps) if steps else math.nan


def train_seconds(cfg, report: dict, arm: str) -> float:
    """Mean over the arm's runs of their optimizer steps' seconds; a multi-task run logs in its own folder (its
    steps train every task)."""
    seconds = []
    for run in (r for r in report["runs"] if r["arm"] == arm):
        folder = Path(run["folder"])
        if arm == MULTITASK_KD:
            folder = Layout(cfg).multitask(run["fold"], run["seed"], KD)
        log = folder / "metrics.jsonl"
        seconds.append(step_seconds(log) if log.is_file() else math.nan)
    return math.fsum(seconds) / len(seconds) if seconds else math.nan


def arm_row(label: str, report: dict, arm: str, train_s: float = math.nan, note: str = "") -> dict:
    """One arm of a report as a table row (the paired difference only on the KD arm, which it is about)."""
    a = report["arms"][arm]
    paired = report.get("paired_difference") if arm == KD else None
    return {"method": label, "arm": arm, "runs": a["n"],
            **{m: {k: _nan(a["metrics"][m][k]) for k in ("mean", "std")} for m in METRICS},
            "percent_of_teacher": _nan(a["percent_of_teacher"]["accuracy"]),
            "speedup": _nan(a["speedup_vs_teacher"]), "train_seconds": train_s,
            "paired": None if not paired else {m: {"mean": _nan(paired["metrics"][m]["mean"]),
                                                   "se": _nan(paired["metrics"][m]["se"]), "n": paired["n"]}
                                               for m in METRICS},
            "note": note}


def ensemble_probabilities(folders: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, gold labels, mean over teachers of softmax(scores)) of the teachers' runs on one fold, in float64;
    ReaderError when the runs did not score the same examples with the same labels."""
    runs = [[row for _, row in json_objects(Path(f) / PREDICTIONS_FILE)] for f in folders]
    ids, labels = [r["id"] for r in runs[0]], [r["label"] for r in runs[0]]
    probabilities = []
    for folder, rows in zip(folders, runs):
        if [r["id"] for r in rows] != ids or [r["label"] for r in rows] != labels:
            raise ReaderError(f"{folder}/{PREDICTIONS_FILE}: other examples or labels than {folders[0]}'s; an "
                              "ensemble averages the teachers on the same held-out examples")
        scores = np.asarray([r["scores"] for r in rows], dtype=np.float64)
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities.append(shifted / shifted.sum(axis=1, keepdims=True))
    return ids, np.asarray(labels, dtype=np.int64), np.mean(probabilities, axis=0)


def ensemble_row(label: str, report: dict) -> dict:
    """The teachers' ensemble per fold (mean probabilities, argmax), mean ± std over folds, % of the teacher arm."""
    teachers = [r for r in report["runs"] if r["arm"] == TEACHER or r["arm"].startswith(f"{TEACHER}-")]
    per_fold = []
    for fold in sorted({r["fold"] for r in teachers}):
        folders = [Path(r["folder"]) for r in teachers if r["fold"] == fold]
        _, labels, probabilities = ensemble_probabilities(folders)
        per_fold.append(task_metrics("classification", labels, probabilities.argmax(axis=1), probabilities.shape[1]))
    metrics = {m: summarize([f[m] for f in per_fold]) for m in METRICS}
    teacher_mean = _nan(report["arms"][TEACHER]["metrics"]["accuracy"]["mean"])
    arms = sorted({r["arm"] for r in teachers})
    return {"method": label, "arm": f"ensemble of {len(arms)} teachers", "runs": len(per_fold),
            **{m: {"mean": metrics[m]["mean"], "std": metrics[m]["std"]} for m in METRICS},
            "percent_of_teacher": percent_of(metrics["accuracy"]["mean"], teacher_mean), "speedup": math.nan,
            "train_seconds": math.nan, "paired": None,
            "note": f"mean of the probabilities of {', '.join(arms)} (T = 1), scored from their predictions.jsonl"}


def method_rows(name: str, cfg, *, reference: bool = False) -> list[dict]:
    """A method's rows: its student (its teacher and baseline first when `reference`), and for a config with
    several teachers their ensemble."""
    path, arm = report_of(cfg)
    report = json_document(path)
    rows = []
    if reference:
        rows += [arm_row(f"teacher ({name})", report, TEACHER), arm_row(f"no-KD baseline ({name})", report, BASELINE)]
    note = "" if arm == KD else "multi-task student, tweets task; 3-fold CV of its own tweets sample (bam.yaml)"
    rows.append(arm_row(name, report, arm, train_seconds(cfg, report, arm), note))
    if len(cfg.teacher.seeds) > 1:
        rows.append(ensemble_row(f"{name}: teacher ensemble", report))
    return rows


def _num(value: float, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:{spec}}"


def _paired(paired: Optional[dict], metric: str) -> str:
    if not paired:
        return "n/a"
    d = paired[metric]
    return f"{_num(d['mean'], f'+.{DECIMALS}f')} ± {_num(d['se'], f'.{DECIMALS}f')} ({d['n']})"


HEADER = ["method", "arm", "accuracy", "macro-F1", "% of teacher (accuracy)", "speed-up", "train s / seed",
          "KD − baseline: accuracy ± SE (pairs)", "KD − baseline: macro-F1 ± SE (pairs)", "runs"]


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table, means and stds at the finetune report's precision."""
    def cells(r: dict) -> list[str]:
        shown = [f"{_num(r[m]['mean'], f'.{DECIMALS}f')} ± {_num(r[m]['std'], f'.{DECIMALS}f')}" for m in METRICS]
        return [r["method"], r["arm"], *shown, _num(r["percent_of_teacher"], ".2f") + "%" * math.isfinite(
            r["percent_of_teacher"]), _num(r["speedup"], ".2f") + "×" * math.isfinite(r["speedup"]),
            _num(r["train_seconds"], ".0f"), _paired(r["paired"], "accuracy"), _paired(r["paired"], "macro_f1"),
            str(r["runs"])]

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]) + "\n"


FOOTNOTE = ("accuracy, macro-F1: mean ± sample std over seeds (folds × seeds for bam) from each method's "
            "report.json; % of teacher and speed-up (student sequences/s ÷ teacher's, CPU, the report's batch and "
            "threads) from the same report; train s / seed: the KD run's optimizer steps summed from its metrics.jsonl "
            "(tokens ÷ tokens/s per step; loading, validation, prediction and export not included); KD − baseline: "
            "the report's paired difference per seed, mean ± standard error, n/a where the report has none.")


def write_table(out: Path, rows: list[dict], header: dict, extra: dict) -> str:
    """table.md (the header lines, the table, its footnote and the rows' notes) and table.json beside it (with
    `extra`); returns table.md's text."""
    notes = [f"- {r['method']}: {r['note']}" for r in rows if r["note"]]
    text = "\n".join(f"{k}: {v}" for k, v in header.items()) + "\n\n" + markdown(rows) + "\n" + FOOTNOTE + "\n"
    text += ("\n" + "\n".join(notes) + "\n") if notes else ""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "table.json", json.dumps(json_safe({**header, "rows": rows, **extra}), indent=1) + "\n")
    return text
