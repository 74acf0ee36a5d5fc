"""The time each demo step took here, the config knobs that scale it, and the command that runs it on a cluster.

Times come from the steps file scripts/demo.sh writes (python -m report.steps); knob values from the stage
configs themselves, so the table says what this run used.
"""

from __future__ import annotations

from dataclasses import dataclass

from report.numbers import Numbers


@dataclass(frozen=True)
class StepScaling:
    step: str  # the name in the steps file
    stage: str  # which stage config ("" for setup)
    knobs: tuple[str, ...]  # dotted config keys that set the step's size
    cluster: str  # how to run it on more machines; {config} is the stage's config file


PY = ".venv/bin/python"
STEPS = (
    StepScaling("setup", "", (), "once per node, or bake `bash scripts/setup.sh` into the job's container image"),
    StepScaling("teacher", "teacher", ("max_sequences", "steps", "batch_size"),
                f"`sbatch --gpus 1 --wrap '{PY} -m teacher --config {{config}}'`"),
    StepScaling("transfer_set", "pipeline", ("corpus.max_documents", "augment.copies", "num_shards", "batch_size"),
                "a Beam runner: `python -m data_pipeline --config {config} --runner FlinkRunner --flink_master "
                "host:8081 --parallelism 64` (README, Beam runners), or one SLURM node: `sbatch -c 32 --wrap "
                f"'{PY} -m data_pipeline --config {{config}} --direct_num_workers 32'`"),
    StepScaling("general_distillation", "pretrain",
                ("steps", "student.num_layers", "engine.micro_batch", "engine.grad_accum", "engine.zero_stage"),
                "`python -m launch slurm --config {config} --nodes 4 --gpus-per-node 8 --time 24:00:00` "
                "(preemption checkpoints and requeue included)"),
    StepScaling("general_evaluation", "evaluate", ("heldout.max_sequences", "speed.repeats"),
                f"`sbatch -c 8 --wrap '{PY} -m evaluate --config {{config}}'`"),
    StepScaling("task_distillation", "finetune",
                ("evaluation.folds", "transfer.augment.copies", "teacher.steps", "distill.steps"),
                f"`{PY} -m finetune folds --config {{config}}`, then a job per fold: `sbatch --array=0-4 --gpus 1 "
                f"--wrap 'for s in teacher transfer distill speed; do {PY} -m finetune $s --config {{config}} "
                "--fold $SLURM_ARRAY_TASK_ID || exit 1; done'`"),
    StepScaling("int8_export", "finetune", ("deploy.threads", "deploy.speed_length"),
                f"CPU only: `sbatch --array=0-4 -c 4 --wrap '{PY} -m finetune deploy --config {{config}} "
                f"--fold $SLURM_ARRAY_TASK_ID'`, then `{PY} -m finetune report --config {{config}}`"),
)


def _knob(n: Numbers, file: str, dotted: str) -> str | None:
    data = n.value(file)  # read once per file; show() below records the value from the same copy
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None  # the stage's default: not in the file, so not shown
        data = data[part]
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        return None
    return f"`{dotted}` = {n.show(file, *dotted.split('.'), fmt='d' if isinstance(data, int) else 'g')}"


def scaling_section(n: Numbers, steps_file: str, configs: dict[str, str]) -> list[str]:
    """The time-per-step table with the knobs and the cluster command of each step."""
    recorded = n.value(steps_file)
    lines = ["## Time per step here, and how to scale each", "",
             "Minutes on this machine (the longest run of each step since its command last changed: a rerun that finds "
             "the work done takes seconds). The knobs are the config keys that set a step's size, with this run's "
             "values; the last column runs the step on a cluster.", "",
             "| step | minutes | config | knobs | on a cluster |", "|---|---:|---|---|---|"]
    timed = [s for s in STEPS if s.step in recorded]
    for s in timed:
        config = configs.get(s.stage, "")
        knobs = [k for k in (_knob(n, config, key) for key in s.knobs) if k] if config else []
        lines.append(f"| {s.step} | {n.show(steps_file, s.step, 'work_seconds', fmt='.1f', scale=1 / 60)} | "
                     f"{f'`{config}`' if config else ''} | {'<br>'.join(knobs)} | {s.cluster.format(config=config)} |")
    total = n.show_sum([(steps_file, [s.step, "work_seconds"], 1) for s in timed], fmt=".1f", scale=1 / 60)
    lines += [f"| **all steps** | **{total}** | | | |", "",
              "Student shape: `student.num_layers` (and `student.hidden_size` for narrower students, "
              "`configs/recipes/`) in the pretrain config. Nodes: `--nodes` of `python -m launch slurm` for general "
              "distillation, `--array` jobs for the folds of task distillation; every stage resumes after a kill.",
              "", "![time per step](steps.png)", ""]
    return lines
