"""Launchers: `python -m launch local` (N ranks on one machine) and `python -m launch slurm` (an sbatch job with
preemption, checkpoint and requeue) run every training stage by the same plan (launch/plans.py) and give it the same
environment contract; `python -m launch testcluster` starts a real multi-host SLURM cluster on one machine."""
