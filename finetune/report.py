"""The finetune report: teacher, distilled student and hard-label baseline, side by side, from run folders.

Every number in the report is read from the runs' own files (eval.json, predictions.jsonl,
metrics.jsonl), never re-derived from memory of a training job, so the report can be rebuilt at any time
from the folders alone. Before anything is written the runs are cross-checked: each eval.json's metrics
must follow from its predictions.jsonl, and all runs of a fold must have scored the same held-out
examples with the same labels; a comparison that is not like for like is refused rather than printed.

Outputs (each written atomically; report.md last, so its presence means the report is complete):
report.md, report.json (the same numbers unrounded, with the paired difference kd − baseline per fold and seed),
metrics.png, loss_<arm>.png per arm with a training
log, predictions.csv, configs/<name>.<ext>. Files of an earlier report that this one does not produce are
left in place (never deleted), but report.md links only to this report's files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from kdlib.errors import ReaderError
from kdlib.runtime.io import atomic_write_bytes, atomic_write_text, json_safe
from kdlib.runtime.jsonl import json_document, json_objects
from kdlib.runtime.metrics import read_metrics
from kdlib.runtime.plots import finish_bar_chart, loss_curve, pyplot
from kdlib.tasks.metrics import TASK_TYPES, percent_of, summarize, task_metrics
from finetune.layout import BASELINE, KD, TEACHER

ARM_ORDER = (TEACHER, KD, BASELINE)  # known arms first, then any others alphabetically; the teacher is the
#                                      reference arm for "% of teacher" and speed-up
DECIMALS = 4  # metric means and stds in report.md (report.json is unrounded)
METRIC_TOLERANCE = 1e-6  # eval.json vs metrics recomputed from predictions.jsonl (see _check_predictions)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path) -> dict:
    try:
        data = json_document(path)
    except FileNotFoundError:
        raise ReaderError(f"{path}: missing; every run folder given to the report needs its eval.json") from None
    if not isinstance(data, dict):
        raise ReaderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(path: Path, data: dict, key: str, check, expected: str, prefix: str = ""):
    if key not in data or not check(data[key]):
        got = repr(data[key]) if key in data else "nothing"
        raise ReaderError(f"{path}: field '{prefix}{key}': expected {expected}, got {got}")
    return data[key]


def _eval_record(folder: Path) -> dict:
    """One run's eval.json, validated, plus the folder it came from."""
    path = folder / "eval.json"
    data = _read_json(path)
    arm = _require(path, data, "arm", lambda v: isinstance(v, str) and v != "", "a non-empty arm name")
    fold = _require(path, data, "fold", _is_int, "an int")
    seed = _require(path, data, "seed", _is_int, "an int")
    task_type = _require(path, data, "task_type", lambda v: v in TASK_TYPES, f"one of {', '.join(TASK_TYPES)}")
    metrics = _require(path, data, "metrics", lambda v: isinstance(v, dict) and v and all(
        isinstance(k, str) and (_is_number(x) or x is None) for k, x in v.items()),
        "an object of metric name -> number (null for undefined)")
    parameters = _require(path, data, "parameters", lambda v: _is_int(v) and v >= 0, "an int >= 0")
    speed = data.get("speed")  # optional: a run whose speed was not measured shows n/a
    if speed is not None:
        _require(path, data, "speed", lambda v: isinstance(v, dict), "an object (or no field at all)")
        _require(path, speed, "sequences_per_s", lambda v: _is_number(v) and v > 0, "a number > 0", "speed.")
        for key in ("batch_size", "threads"):
            _require(path, speed, key, lambda v: _is_int(v) and v >= 1, "an int >= 1", "speed.")
    layers = data.get("layers_executed")  # optional: an AdaShare task model executes a subset of the layers
    if layers is not None:
        _require(path, data, "layers_executed", lambda v: _is_int(v) and v >= 1, "an int >= 1 (or no field at all)")
    labels = _require(path, data, "labels", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                      "a list of label names")
    if task_type == "classification" and not labels:
        raise ReaderError(f"{path}: field 'labels': a classification run needs its label names, got []")
    return {"arm": arm, "fold": fold, "seed": seed, "task_type": task_type, "labels": labels,
            "metrics": {k: math.nan if v is None else float(v) for k, v in metrics.items()},
            "parameters": parameters, "speed": None if speed is None else dict(speed), "folder": str(folder),
            "layers_executed": layers}


def collect(run_folders: Iterable[str | os.PathLike]) -> list[dict]:
    """The eval.json record of every run folder, checked to form one comparable experiment.

    All runs must share a task type and metric names, and no (arm, fold, seed) may appear twice: a
    duplicate would be counted twice in a mean. Errors name the files involved (ReaderError).
    """
    records, seen = [], {}
    for folder in run_folders:
        record = _eval_record(Path(folder))
        key = (record["arm"], record["fold"], record["seed"])
        if key in seen:
            raise ReaderError(f"{folder}/eval.json: arm {key[0]!r} fold {key[1]} seed {key[2]} is also in "
                              f"{seen[key]}/eval.json; give each run folder once")
        seen[key] = folder
        records.append(record)
    if not records:
        raise ReaderError("run_folders: expected at least one run folder, got none")
    first = records[0]
    for record in records[1:]:
        for field, mine, theirs in (("task_type", record["task_type"], first["task_type"]),
                                    ("metrics", sorted(record["metrics"]), sorted(first["metrics"]))):
            if mine != theirs:
                raise ReaderError(f"{record['folder']}/eval.json: field '{field}': expected {theirs} like "
                                  f"{first['folder']}/eval.json, got {mine}; one report compares one task")
    return records


def _arm_key(arm: str) -> tuple:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def _settings(runs: list[dict]) -> list[dict]:
    pairs = sorted({(r["speed"]["batch_size"], r["speed"]["threads"]) for r in runs if r["speed"] is not None})
    return [{"batch_size": b, "threads": t} for b, t in pairs]


def _speed(runs: list[dict]) -> dict:
    """sequences/s over the arm's runs; undefined (nan, n=0) unless every run was timed."""
    if not runs or any(r["speed"] is None for r in runs):
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return summarize([r["speed"]["sequences_per_s"] for r in runs])


def aggregate(records: list[dict]) -> dict:
    """Per-arm summary over folds x seeds, plus per-fold summaries over seeds.

    "% of teacher" divides an arm's mean by the teacher's mean over the teacher's runs *on the folds
    that arm was evaluated on* (nan when the teacher lacks one of them, or there is no teacher arm).
    The speed-up divides mean sequences/s by the teacher's, and is nan unless both arms were measured
    with the same (batch_size, threads) settings: a ratio across settings says nothing about the model.
    A run without a "speed" field makes its arm's sequences/s (and speed-up) nan.
    """
    names = list(records[0]["metrics"])
    arms = sorted({r["arm"] for r in records}, key=_arm_key)
    by_arm = {arm: [r for r in records if r["arm"] == arm] for arm in arms}
    teacher = by_arm.get(TEACHER, [])
    summary: dict[str, dict] = {}
    for arm in arms:
        runs = by_arm[arm]
        counts = sorted({r["parameters"] for r in runs})
        variable_depth = all(r["layers_executed"] is not None for r in runs)  # AdaShare: a policy per fold and seed
        if len(counts) > 1 and not variable_depth:
            raise ReaderError(f"arm {arm!r}: runs report different parameter counts {counts} "
                              f"({', '.join(r['folder'] for r in runs)}); one arm is one model size")
        folds = sorted({r["fold"] for r in runs})
        reference = [r for r in teacher if r["fold"] in folds]
        covered = bool(teacher) and set(folds) <= {r["fold"] for r in teacher}
        metrics = {m: summarize([r["metrics"][m] for r in runs]) for m in names}
        teacher_means = {m: summarize([r["metrics"][m] for r in reference])["mean"] if covered else math.nan
                         for m in names}
        speed, teacher_speed = _speed(runs), _speed(teacher)["mean"]
        comparable = bool(teacher) and _settings(runs) == _settings(teacher)
        summary[arm] = {
            "n": len(runs), "folds": folds, "seeds": sorted({r["seed"] for r in runs}),
            "metrics": metrics,
            "teacher_mean_same_folds": teacher_means,
            "percent_of_teacher": {m: percent_of(metrics[m]["mean"], teacher_means[m]) for m in names},
            "parameters": counts[0], "parameters_max": counts[-1],
            "layers_executed": summarize([r["layers_executed"] for r in runs]) if variable_depth else None,
            "sequences_per_s": speed, "speed_settings": _settings(runs),
            "speedup_vs_teacher": speed["mean"] / teacher_speed if comparable else math.nan,
        }
    per_fold = []
    for fold in sorted({r["fold"] for r in records}):
        for arm in arms:
            runs = [r for r in by_arm[arm] if r["fold"] == fold]
            if runs:
                per_fold.append({"fold": fold, "arm": arm, "seeds": sorted(r["seed"] for r in runs),
                                 "metrics": {m: summarize([r["metrics"][m] for r in runs]) for m in names}})
    return {"task_type": records[0]["task_type"], "metrics": names,
            "reference_arm": TEACHER if teacher else None, "arms": summary, "per_fold": per_fold,
            "paired_difference": paired_difference(records, names)}


def paired_difference(records: list[dict], names: list[str], arm: str = KD, reference: str = BASELINE) -> Optional[dict]:
    """`arm` − `reference` per (fold, seed) that both have (the same held-out examples, the same student seed and
    initialisation): per metric the differences, their mean, sample std (ddof=1) and standard error std / sqrt(n)
    (nan for one pair); None when no (fold, seed) has both arms."""
    mine = {(r["fold"], r["seed"]): r for r in records if r["arm"] == arm}
    theirs = {(r["fold"], r["seed"]): r for r in records if r["arm"] == reference}
    keys = sorted(set(mine) & set(theirs))
    if not keys:
        return None
    metrics = {}
    for m in names:
        diffs = [mine[k]["metrics"][m] - theirs[k]["metrics"][m] for k in keys]
        summary = summarize(diffs)
        se = summary["std"] / math.sqrt(summary["n"]) if summary["n"] > 1 else math.nan
        metrics[m] = {**summary, "se": se, "differences": diffs}
    return {"arm": arm, "reference": reference, "n": len(keys),
            "pairs": [{"fold": f, "seed": s} for f, s in keys], "metrics": metrics}


def read_predictions(folder: str | os.PathLike, record: dict) -> list[dict]:
    """predictions.jsonl of one run: {"id", "label", "prediction"} per example, validated line by line."""
    path = Path(folder) / "predictions.jsonl"
    if not path.is_file():
        raise ReaderError(f"{path}: missing; every evaluated run writes its per-example predictions")
    classification = record["task_type"] == "classification"
    num_labels = len(record["labels"])
    rows = []
    for number, row in json_objects(path):
        ok = isinstance(row.get("id"), str)
        for key in ("label", "prediction"):
            value = row.get(key)
            ok = ok and (_is_int(value) and 0 <= value < num_labels if classification
                         else _is_number(value) and math.isfinite(value))
        if not ok:
            expected = f"class ids 0..{num_labels - 1}" if classification else "finite numbers"
            raise ReaderError(f"{path}: line {number}: expected {{\"id\": str, \"label\", \"prediction\": "
                              f"{expected}}}, got {json.dumps(row)[:200]}")
        rows.append({"id": row["id"], "label": row["label"], "prediction": row["prediction"]})
    if not rows:
        raise ReaderError(f"{path}: holds no predictions")
    return rows


def _check_predictions(records: list[dict], predictions: list[list[dict]]) -> None:
    """eval.json must follow from predictions.jsonl, and each fold's runs must share examples and labels.

    Metrics lie in [-1, 1]; predictions stored as float32 move a correlation by ~1e-7, while scoring a
    different evaluation moves accuracy by at least 1/n (1e-5 even for 100k examples): hence 1e-6.
    """
    for record, rows in zip(records, predictions):
        folder = record["folder"]
        try:
            recomputed = task_metrics(record["task_type"], [r["label"] for r in rows],
                                      [r["prediction"] for r in rows], len(record["labels"]) or None)
        except ValueError as error:
            raise ReaderError(f"{folder}/predictions.jsonl: cannot be scored ({error})") from None
        for name, value in record["metrics"].items():
            if name in recomputed:
                again = recomputed[name]
                same = (math.isnan(value) and math.isnan(again)) or abs(value - again) <= METRIC_TOLERANCE
                if not same:
                    raise ReaderError(f"{folder}/eval.json: field 'metrics.{name}': {value!r}, but "
                                      f"predictions.jsonl gives {again!r}; the two files are from different "
                                      "evaluations")
    first: dict[int, tuple[dict, dict]] = {}
    for record, rows in zip(records, predictions):
        labels = {r["id"]: r["label"] for r in rows}
        if len(labels) != len(rows):
            raise ReaderError(f"{record['folder']}/predictions.jsonl: an example id appears more than once")
        if record["fold"] not in first:
            first[record["fold"]] = (record, labels)
            continue
        other, theirs = first[record["fold"]]
        if labels != theirs:
            diff = sorted(set(labels) ^ set(theirs)) or sorted(k for k in labels if labels[k] != theirs[k])
            raise ReaderError(f"{record['folder']}/predictions.jsonl: fold {record['fold']} differs from "
                              f"{other['folder']}/predictions.jsonl (ids or labels, e.g. {diff[:3]}); every arm "
                              "must be evaluated on the same held-out examples")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "unnamed"


def _num(value: float, spec: str, suffix: str = "") -> str:
    return f"{value:{spec}}{suffix}" if math.isfinite(value) else "n/a"


def _mean_std(summary: dict) -> str:
    return f"{_num(summary['mean'], f'.{DECIMALS}f')} ± {_num(summary['std'], f'.{DECIMALS}f')}"


def _parameters(arm: dict) -> str:
    low, high = arm["parameters"], arm.get("parameters_max", arm["parameters"])
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows])


def _markdown(title: str, result: dict, files: dict, appendix: str = "") -> str:
    names, arms = result["metrics"], result["arms"]
    runs = sum(a["n"] for a in arms.values())
    lines = [f"# {title}", "",
             f"Task: {result['task_type']}; {runs} runs in {len(arms)} arms ({', '.join(arms)}), every arm scored "
             "on the same held-out examples of each fold.", "",
             f"Metrics are mean ± sample std (ddof=1; 0 for a single run) over folds × seeds, rounded to {DECIMALS} "
             "decimals (report.json holds them unrounded). % of teacher = 100 × arm mean / teacher mean on the "
             "same folds. Speed-up = arm sequences/s ÷ teacher sequences/s, each run measured on its own; shown "
             "only where both used the same batch size and threads. n/a = undefined.", "",
             "## Summary", ""]
    header = (["arm"] + names + [f"% of teacher ({m})" for m in names]
              + ["parameters", "sequences/s", "speed-up", "runs"])
    rows = [[arm] + [_mean_std(a["metrics"][m]) for m in names]
            + [_num(a["percent_of_teacher"][m], ".2f", "%") for m in names]
            + [_parameters(a), _num(a["sequences_per_s"]["mean"], ".1f"),
               _num(a["speedup_vs_teacher"], ".2f", "×"), str(a["n"])] for arm, a in arms.items()]
    lines += _table(header, rows)
    settings = {arm: " and ".join(f"batch_size {s['batch_size']}, threads {s['threads']}" for s in a["speed_settings"])
                or "not timed" for arm, a in arms.items()}
    lines += ["", "Speed settings: " + "; ".join(f"{arm} ({s})" for arm, s in settings.items()) + ".", ""]
    depth = {arm: a["layers_executed"] for arm, a in arms.items() if a.get("layers_executed")}
    if depth:
        lines += ["Layers executed per task model (AdaShare; mean ± std over folds × seeds, parameters min–max): "
                  + "; ".join(f"{arm} {_mean_std(d)}" for arm, d in depth.items()) + ".", ""]
    paired = result.get("paired_difference")
    if paired:
        lines += [f"## Paired difference: {paired['arm']} − {paired['reference']}", "",
                  f"Per (fold, seed) with both arms ({paired['n']} pairs: the same held-out examples and student seed): "
                  "mean of the differences ± sample std, and its standard error std / √n (n/a for one pair).", ""]
        lines += _table(["metric", "mean difference", "std", "standard error", "pairs"],
                        [[m, _num(d["mean"], f"+.{DECIMALS}f"), _num(d["std"], f".{DECIMALS}f"),
                          _num(d["se"], f".{DECIMALS}f"), str(d["n"])] for m, d in paired["metrics"].items()])
        lines += [""]
    lines += ["## Per fold (mean ± std over seeds)", ""]
    lines += _table(["fold", "arm", "seeds"] + names,
                    [[str(row["fold"]), row["arm"], str(len(row["seeds"]))]
                     + [_mean_std(row["metrics"][m]) for m in names] for row in result["per_fold"]])
    lines += ["", "## Figures", "", f"![metrics by arm]({files['metrics_plot']})", ""]
    lines += [f"![{arm}: training loss]({path})" for arm, path in files["loss_curves"].items()]
    if not files["loss_curves"]:
        lines.append("No run folder holds a metrics.jsonl training log, so there are no loss curves.")
    if appendix:
        lines += ["", appendix.rstrip("\n")]
    lines += ["", "## Files", "", f"- [per-example predictions]({files['predictions']}) (all runs)",
              "- [report.json](report.json) (the numbers above, unrounded)"]
    lines += [f"- [config: {name}]({path})" for name, path in files["configs"].items()]
    return "\n".join(lines) + "\n"


def _metrics_plot(result: dict, path: Path, title: str) -> None:
    """Grouped bars: one group per metric, one bar per arm, error bars = sample std."""
    plt = pyplot()
    names, arms = result["metrics"], list(result["arms"])
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) * len(arms) ** 0.5 + 2), 4))
    for i, arm in enumerate(arms):
        summaries = [result["arms"][arm]["metrics"][m] for m in names]
        means = np.nan_to_num([s["mean"] for s in summaries])
        stds = np.nan_to_num([s["std"] for s in summaries])
        bars = ax.bar(np.arange(len(names)) + (i - (len(arms) - 1) / 2) * width, means, width, yerr=stds,
                      capsize=3, label=arm)
        ax.bar_label(bars, labels=[_num(s["mean"], ".3f") for s in summaries], label_type="center", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names)
    finish_bar_chart(fig, ax, path, ylabel="mean over folds × seeds (± std)", title=title)


def _loss_plots(records: list[dict], report_dir: Path) -> dict[str, str]:
    """One PNG per arm whose runs have a training log: the total loss of each run over steps."""
    files: dict[str, str] = {}
    for arm in sorted({r["arm"] for r in records}, key=_arm_key):
        merged, keys = [], []
        for r in sorted((r for r in records if r["arm"] == arm), key=lambda r: (r["fold"], r["seed"])):
            key = f"fold {r['fold']} seed {r['seed']}"
            points = [{"step": x["step"], key: x["loss"]} for x in read_metrics(Path(r["folder"]) / "metrics.jsonl")
                      if _is_number(x.get("loss"))]
            if points:
                merged += points
                keys.append(key)
        if keys:
            name = f"loss_{_safe(arm)}.png"
            while name in files.values():
                name = name[:-4] + "_.png"
            loss_curve(merged, keys, report_dir / name, title=f"{arm}: training loss per run")
            files[arm] = name
    return files


def _predictions_csv(records: list[dict], predictions: list[list[dict]]) -> str:
    """arm, fold, seed, id, label, prediction, correct (1/0; empty for regression, where it is undefined)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["arm", "fold", "seed", "id", "label", "prediction", "correct"])
    order = sorted(range(len(records)), key=lambda i: (_arm_key(records[i]["arm"]), records[i]["fold"],
                                                        records[i]["seed"]))
    for i in order:
        r = records[i]
        for row in predictions[i]:
            correct = int(row["label"] == row["prediction"]) if r["task_type"] == "classification" else ""
            writer.writerow([r["arm"], r["fold"], r["seed"], row["id"], repr(row["label"]),
                             repr(row["prediction"]), correct])
    return out.getvalue()


def write_report(report_dir: str | os.PathLike, run_folders: Iterable[str | os.PathLike], *, title: str,
                 configs: Optional[Mapping[str, str | os.PathLike]] = None, appendix: str = "") -> Path:
    """Read and cross-check the runs, then write the report into `report_dir`; returns report.md's path.

    `configs` maps a name ("kd", "baseline", ...) to a resolved config file to copy into configs/; `appendix`:
    Markdown sections placed before the list of files (the int8 deployment table).
    Nothing is written until every input has been read and checked.
    """
    report_dir = Path(report_dir)
    records = collect(run_folders)
    predictions = [read_predictions(r["folder"], r) for r in records]
    _check_predictions(records, predictions)
    result = aggregate(records)
    copies: dict[str, tuple[str, bytes]] = {}
    for name, source in (configs or {}).items():
        source = Path(source)
        try:
            data = source.read_bytes()
        except OSError as error:
            raise ReaderError(f"configs[{name!r}]: {source}: cannot be read ({error.strerror})") from None
        copies[name] = (f"configs/{_safe(name)}{source.suffix or '.yaml'}", data)
    report_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics_plot": "metrics.png", "loss_curves": _loss_plots(records, report_dir),
             "predictions": "predictions.csv", "configs": {name: rel for name, (rel, _) in copies.items()}}
    _metrics_plot(result, report_dir / files["metrics_plot"], title)
    atomic_write_text(report_dir / files["predictions"], _predictions_csv(records, predictions))
    for rel, data in copies.values():
        atomic_write_bytes(report_dir / rel, data)
    runs = [{k: r[k] for k in ("arm", "fold", "seed", "metrics", "parameters", "speed", "folder")} for r in records]
    document = {"title": title, **result, "runs": runs, "files": files, "display_decimals": DECIMALS}
    atomic_write_text(report_dir / "report.json", json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
    atomic_write_text(report_dir / "report.md", _markdown(title, result, files, appendix))
    return report_dir / "report.md"
