"""What a launcher runs for each stage: its steps in order, each on every rank of the job, once, or once as the
client of a Dask cluster.

Both launchers read this one table, so `launch local` and the sbatch script `launch slurm` renders run the same
commands in the same order. A step "on every rank" trains on the training core (the rank contract); a step run
"once" reads or writes files only (fold splits, the teacher pass of a transfer set, timing, reports) or trains
one small model on one process (the teacher preparations). A "dask" step (the transfer-set pipeline) is not
rank-parallel: it runs once, and the launcher gives it workers (launch/dask_block.py: on SLURM a scheduler on
the first node and a worker on every node; locally `--local-workers`). A rerun of the whole plan skips what is
finished, so after a preemption or a lost node the same command (or SLURM's requeue) resumes where the job stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kdlib.errors import KDError


@dataclass(frozen=True)
class Step:
    name: Optional[str]  # the stage's sub-step (`python -m finetune teacher`), None for a stage without steps
    on_ranks: bool  # True: every rank of the job runs it together; False: one process runs it
    dask: bool = False  # one process, the client of a Dask cluster the launcher starts (launch/dask_block.py)

    def log_name(self, stage: str) -> str:
        """Its output file under the job's log folder (`%t`: SLURM's task number)."""
        if not self.on_ranks:
            return f"{self.name or stage}.out"
        return "rank-%t.out" if self.name is None else f"{self.name}-rank-%t.out"


PLANS: dict[str, tuple[Step, ...]] = {
    "pretrain": (Step(None, True),),
    "finetune": (Step("folds", False), Step("teacher", True), Step("transfer", False), Step("distill", True),
                 Step("speed", False), Step("deploy", False), Step("report", False)),
    "teacher": (Step(None, False),),  # the masked-LM head over a frozen encoder: one process
    "teacher.decoder": (Step(None, False),),  # the decoder teacher from scratch: one process
    # the transfer-set pipeline: one process, the client of the Dask cluster the job starts
    "data_pipeline": (Step(None, False, dask=True),),
}
STAGES = tuple(PLANS)


def plan(stage: str, step: Optional[str] = None) -> tuple[Step, ...]:
    """The stage's steps, or only `step` (--step); a step name the stage does not have is refused."""
    steps = PLANS[stage]
    if step is None:
        return steps
    named = [s for s in steps if s.name == step]
    if not named:
        known = [s.name for s in steps if s.name]
        raise KDError(f"--step: {stage} has " + (f"the steps {', '.join(known)}, not {step!r}" if known
                                                 else f"no steps (got {step!r}); leave --step out"))
    return tuple(named)


def command(python: str, stage: str, step: Step, config: str, sets: list[str], stage_args: list[str]) -> list[str]:
    """argv of one step: `python -m <stage> [<step>] --config X [--set k=v ...] [stage args]`."""
    argv = [python, "-m", stage] + ([step.name] if step.name else []) + ["--config", config]
    for item in sets:
        argv += ["--set", item]
    return argv + list(stage_args)
