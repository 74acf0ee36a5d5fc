#!/bin/bash
# Rendered by `python -m launch slurm` on $rendered. Edit freely; submit with: sbatch $script
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks_per_node
#SBATCH --cpus-per-task=$cpus_per_task
$gpus_line
$time_line
$partition_line
$signal_line
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output="$log_pattern/job-%j.out"
#
# --signal (training stages): every task gets SIGUSR1 $warn_seconds s before the time limit (or on `scancel --signal=USR1`);
#   the trainer checkpoints at the next step boundary and exits 75.
# --requeue and the `scontrol requeue` below: the job then restarts under the same id and resumes from
#   the checkpoint `latest` names. --open-mode=append: each restart appends to this job's log;
#   every rank of every start writes its own log under $log_dir/job-<id>/restart-<n>/.

set -uo pipefail
cd $workdir
# The rendezvous, from SLURM itself: the first host of the allocation, a port from the job id.
# (Each rank reads RANK / LOCAL_RANK / WORLD_SIZE from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.)
export MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$$((29500 + SLURM_JOB_ID % 1000))
$exports
restart=$${SLURM_RESTART_COUNT:-0}
ranks=$log_dir_q/job-$$SLURM_JOB_ID/restart-$$restart  # this start's logs: [<step>-]rank-<R>.out, <step>.out
mkdir -p "$$ranks"
echo "[launch] job $$SLURM_JOB_ID restart $$restart: $$SLURM_NTASKS tasks on $$SLURM_JOB_NODELIST, rendezvous $$MASTER_ADDR:$$MASTER_PORT, rank logs in $$ranks, $$(date -u +%FT%TZ)"
if [ "$$restart" -gt 0 ]; then  # requeued: after a preemption, or by SLURM after a node failure (srun names the node)
  echo "[launch] job $$SLURM_JOB_ID restart $$restart resumes from: $$(find $out_dir -path '*checkpoints/latest' -exec sh -c 'echo "$$1 -> $$(cat "$$1")"' _ {} \; | paste -sd ';' -)"
fi

# The stage's steps (launch/plans.py): a training step on every task (srun), any other step once, here on the
# first node; each stops the job at its first failure. A rerun skips the work that is finished.
$steps
if [ "$$code" -eq 75 ]; then
  echo "[launch] preempted after a checkpoint: requeueing job $$SLURM_JOB_ID"
  scontrol requeue "$$SLURM_JOB_ID"
fi
echo "[launch] job $$SLURM_JOB_ID restart $$restart ended with exit code $$code"
exit "$$code"
