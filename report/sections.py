"""The sections of report.md, each a list of Markdown lines whose every number goes through the registry.

Prose here carries no digits of its own: a number in report.md is either read from a metrics file or a config
(and recorded in numbers.json) or sits in a code span (commands, paths), so `report.numbers.verify` can check all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from report.config import ReportConfig
from report.numbers import Numbers

EVAL_COLUMNS = (  # (evaluation.json metric, title, format, shown with "% of teacher")
    ("simlex999_spearman", "SimLex-999 ρ", ".4f", True),
    ("wordsim353_spearman", "WordSim-353 ρ", ".4f", True),
    ("masked_top1_agreement", "masked top-1 agreement", ".4f", False),
    ("masked_kl", "masked KL ↓", ".4f", False),
    ("pooled_cosine", "pooled cosine", ".4f", False),
)
ARM_TITLES = {"teacher": "teacher (fine-tuned per fold)", "kd": "KD student", "baseline": "no-KD baseline",
              "kd-int8": "int8 KD student (onnxruntime)"}
ARM_ORDER = ("teacher", "kd", "baseline", "kd-int8")


@dataclass
class Paths:
    """Every file the report reads, found through the stage configs' output_dir."""

    steps: str
    teacher_report: str
    general_metrics: str
    evaluation: str
    evaluation_png: str
    task_report: str
    task_png: str
    deploy: str  # fold 0's int8 table (deploy.json), the first seed's


def pm(n: Numbers, file: str, *key, fmt: str = ".4f") -> str:
    """mean ± std of a summary {"mean", "std"} at file[key]."""
    return f"{n.show(file, *key, 'mean', fmt=fmt)} ± {n.show(file, *key, 'std', fmt=fmt)}"


def general_section(n: Numbers, p: Paths, cfg: ReportConfig) -> list[str]:
    """General student vs teacher on held-out text, the untrained initialisation as a row."""
    models = n.value(p.evaluation, "models")
    lines = ["## The general student against the teacher", "",
             "Scores on text no student saw (Wikipedia articles the transfer set left out) and on word-similarity "
             "benchmarks; in brackets the share of the teacher's score. The untrained row is the student before "
             "general distillation: the layers it was initialised from.", "",
             "| model | " + " | ".join(t for _, t, _, _ in EVAL_COLUMNS) + " |",
             "|---|" + "---:|" * len(EVAL_COLUMNS)]
    for name in models:
        cells = []
        for key, _, fmt, percent in EVAL_COLUMNS:
            cell = n.show(p.evaluation, "models", name, "metrics", key, fmt=fmt)
            if percent and name != cfg.teacher_model:
                cell += f" ({n.show(p.evaluation, 'models', name, 'percent_of_teacher', key, fmt='.1f')}%)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![general evaluation](general_evaluation.png)", ""]
    return lines


def task_section(n: Numbers, p: Paths, cfg: ReportConfig) -> list[str]:
    """The polarity table: teacher, KD student, no-KD baseline, int8 KD student; mean ± std over folds x seeds."""
    arms = n.value(p.task_report, "arms")
    metrics = n.value(p.task_report, "metrics")
    lines = ["## Task distillation: polarity", "",
             "Every arm is scored on the same held-out fold of the Pang & Lee polarity sample, mean ± sample std over "
             "folds x student seeds (runs).", "",
             "| arm | " + " | ".join(metrics) + f" | % of teacher ({cfg.task_metric}) | runs |",
             "|---|" + "---:|" * (len(metrics) + 2)]
    for arm in [a for a in ARM_ORDER if a in arms] + [a for a in arms if a not in ARM_ORDER]:
        cells = [pm(n, p.task_report, "arms", arm, "metrics", m) for m in metrics]
        share = n.show(p.task_report, "arms", arm, "percent_of_teacher", cfg.task_metric, fmt=".1f")
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(cells)
                     + f" | {share}% | {n.show(p.task_report, 'arms', arm, 'n', fmt='d')} |")
    lines += ["", "![task metrics](task_metrics.png)", ""]
    return lines


def speed_section(n: Numbers, p: Paths, cfg: ReportConfig) -> list[str]:
    """Sequences/s and parameters of the encoders (evaluate) and of the task student fp32 vs int8 (deploy)."""
    ev, dep = p.evaluation, p.deploy
    speed = n.value(ev, "settings", "speed")
    lines = ["## Speed and size on this CPU", ""]
    if speed:
        lines += [f"Encoders, timed side by side at batch {n.show(ev, 'settings', 'speed', 'batch_size', fmt='d')} x "
                  f"{n.show(ev, 'settings', 'speed', 'length', fmt='d')} tokens on "
                  f"{n.show(ev, 'settings', 'speed', 'threads', fmt='d')} thread(s) (`python -m evaluate`):", ""]
    lines += ["| model | parameters | sequences/s | speed-up vs teacher |", "|---|---:|---:|---:|"]
    for name in n.value(ev, "models"):
        lines.append(f"| {name} | {n.show(ev, 'models', name, 'metrics', 'parameters', fmt=',d')} | "
                     f"{n.show(ev, 'models', name, 'metrics', 'sequences_per_s', fmt='.1f')} | "
                     f"{n.show(ev, 'models', name, 'speedup_vs_teacher', fmt='.2f')}x |")
    lines += ["", f"The task student of the first fold as served, at batch {n.show(dep, 'throughput_batch', fmt='d')} x "
                  f"{n.show(dep, 'speed_length', fmt='d')} tokens on {n.show(dep, 'threads', fmt='d')} thread(s) "
                  "(the finetune deploy step):", "",
              "| form | size on disk (MB) | sequences/s | speed-up vs fp32 | agreement with fp32 |",
              "|---|---:|---:|---:|---:|"]
    for form in ("transformers fp32", "onnxruntime int8"):
        c = ("candidates", form)
        lines.append(f"| {form} | {n.show(dep, *c, 'size_bytes', fmt='.2f', scale=1e-6)} | "
                     f"{n.show(dep, *c, 'throughput_seq_per_s', fmt='.1f')} | {n.show(dep, *c, 'speedup', fmt='.2f')}x | "
                     f"{n.show(dep, *c, 'agreement', fmt='.4f')} |")
    lines += ["", "![speed and size](speed_size.png)", ""]
    return lines


def loss_section(curves: dict[str, str]) -> list[str]:
    """The loss curves of every training stage (PNG names by stage)."""
    lines = ["## Loss curves of every training stage", ""]
    for title, png in curves.items():
        lines += [f"**{title}**", "", f"![{title}]({png})", ""]
    return lines


def files_section(names: list[str]) -> list[str]:
    return ["## Files", "", "Every number above is recorded with its source in `numbers.json`; "
            "`python -m report.numbers <this folder>` checks them again.", ""] + [f"- `{x}`" for x in names] + [""]


def target_row(title: str, goal: str, measured: str, met: bool | None) -> str:
    status = "n/a" if met is None else ("met" if met else "**missed**")
    return f"| {title} | {goal} | {measured} | {status} |"


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values)


def targets_section(n: Numbers, p: Paths, cfg: ReportConfig, report_config: str) -> list[str]:
    """Each target, what was measured, met or missed; why, where missed."""
    t, ev, task, rc = cfg.targets, p.evaluation, p.task_report, report_config
    s, m = cfg.student_model, cfg.task_metric
    pct = lambda key: n.value(ev, "models", s, "percent_of_teacher", key)  # noqa: E731
    rows, why = [], []

    sim, ws = pct("simlex999_spearman"), pct("wordsim353_spearman")
    met = min(sim, ws) >= t.word_similarity_percent if _finite(sim, ws) else None
    rows.append(target_row("general student: word similarity", f"≥ {n.show(rc, 'targets', 'word_similarity_percent', fmt='g')}% of teacher",
                           f"SimLex {n.show(ev, 'models', s, 'percent_of_teacher', 'simlex999_spearman', fmt='.1f')}%, "
                           f"WordSim {n.show(ev, 'models', s, 'percent_of_teacher', 'wordsim353_spearman', fmt='.1f')}%", met))
    why += _why(cfg, "word_similarity_percent", met)

    cos = n.value(ev, "models", s, "metrics", "pooled_cosine")
    met = cos >= t.pooled_cosine if _finite(cos) else None
    rows.append(target_row("general student: pooled cosine to the teacher", f"≥ {n.show(rc, 'targets', 'pooled_cosine', fmt='g')}",
                           n.show(ev, "models", s, "metrics", "pooled_cosine", fmt=".4f"), met))
    why += _why(cfg, "pooled_cosine", met)

    up = n.value(ev, "models", s, "speedup_vs_teacher")
    met = up >= t.speedup if _finite(up) else None
    rows.append(target_row("general student: CPU speed", f"≥ {n.show(rc, 'targets', 'speedup', fmt='g')}x the teacher",
                           f"{n.show(ev, 'models', s, 'speedup_vs_teacher', fmt='.2f')}x", met))
    why += _why(cfg, "speedup", met)

    share = n.value(task, "arms", "kd", "percent_of_teacher", m)
    met = share >= t.task_percent if _finite(share) else None
    rows.append(target_row(f"task KD student: {m}", f"≥ {n.show(rc, 'targets', 'task_percent', fmt='g')}% of teacher",
                           f"{n.show(task, 'arms', 'kd', 'percent_of_teacher', m, fmt='.1f')}%", met))
    why += _why(cfg, "task_percent", met)

    kd, base = (n.value(task, "arms", a, "metrics", m) for a in ("kd", "baseline"))
    met = kd["mean"] - base["mean"] > base["std"]
    rows.append(target_row("task KD student against the no-KD baseline", "ahead by more than the baseline's std",
                           f"{n.show_sum([(task, ['arms', 'kd', 'metrics', m, 'mean'], 1), (task, ['arms', 'baseline', 'metrics', m, 'mean'], -1)], fmt='+.4f')} "
                           f"(baseline std {n.show(task, 'arms', 'baseline', 'metrics', m, 'std', fmt='.4f')})", met))
    teacher = n.value(task, "arms", "teacher", "metrics", m)
    if not met and teacher["mean"] <= base["mean"] + base["std"]:
        why.append(f"- **KD against the baseline:** the teacher scores {pm(n, task, 'arms', 'teacher', 'metrics', m)}, "
                   f"the student trained on the labels alone {pm(n, task, 'arms', 'baseline', 'metrics', m)}. A teacher "
                   "no better than the student's own fine-tuning has little to add; its soft targets on the augmented "
                   "sentences carry its mistakes as well.")
    elif not met:
        why.append(f"- **KD against the baseline:** the teacher ({pm(n, task, 'arms', 'teacher', 'metrics', m)}) is "
                   f"ahead of the student trained on the labels alone ({pm(n, task, 'arms', 'baseline', 'metrics', m)}), "
                   "but its soft targets did not carry that lead to the student in this budget; the knobs are "
                   "`distill.steps` and `transfer.augment.copies`.")

    if "kd-int8" in n.value(task, "arms"):
        i8 = n.value(task, "arms", "kd-int8", "metrics", m)["mean"]
        loss = 100 * (kd["mean"] - i8)
        met = loss < t.int8_max_loss_points
        rows.append(target_row("int8 artefact", f"loses < {n.show(rc, 'targets', 'int8_max_loss_points', fmt='g')} point",
                               f"{n.show_sum([(task, ['arms', 'kd', 'metrics', m, 'mean'], 1), (task, ['arms', 'kd-int8', 'metrics', m, 'mean'], -1)], fmt='+.1f', scale=100)} points "
                               f"({n.show(task, 'arms', 'kd-int8', 'metrics', m, 'mean', fmt='.4f')} vs "
                               f"{n.show(task, 'arms', 'kd', 'metrics', m, 'mean', fmt='.4f')})", met))
        why += _why(cfg, "int8_max_loss_points", met)
    lines = ["## Targets", "", "| target | goal | measured | |", "|---|---|---|---|", *rows, ""]
    if why:
        lines += ["Where a target is missed, why:", "", *why, ""]
    return lines


def _why(cfg: ReportConfig, target: str, met: bool | None) -> list[str]:
    if met is False:
        return [f"- **{target}:** " + cfg.notes.get(target, "missed; no analysis recorded in the report config's notes.")]
    return []


def first_paths(cfg: ReportConfig, outputs: dict[str, Path]) -> Paths:
    """The files of a finished demo, from the stage configs' output_dir values."""
    task = outputs["finetune"]
    report = task / "report" / "report.json"
    int8 = sorted(task.glob("fold-0/seed-*/kd-int8/export/deploy.json"))
    deploy = str(int8[0]) if int8 else str(task / "fold-0" / "seed-0" / "kd-int8" / "export" / "deploy.json")
    return Paths(steps=cfg.steps, teacher_report=str(outputs["teacher"] / "teacher_report.json"),
                 general_metrics=str(outputs["pretrain"] / "metrics.jsonl"),
                 evaluation=str(outputs["evaluate"] / "evaluation.json"),
                 evaluation_png=str(outputs["evaluate"] / "evaluation.png"),
                 task_report=str(report), task_png=str(task / "report" / "metrics.png"),
                 deploy=deploy)
