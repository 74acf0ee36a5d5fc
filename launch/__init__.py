"""Launchers: `python -m launch local` (N ranks on one machine) and `python -m launch slurm` (an sbatch job
with preemption, checkpoint and requeue); both give the stage the same environment contract."""
