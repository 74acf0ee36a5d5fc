"""SLURM (sbatch/srun, preemption -> checkpoint -> requeue) and local launchers (next issue)."""
