"""Launchers: `python -m launch local` (N ranks on one machine, exit statuses 0 / 2 / 75); SLURM to come."""
