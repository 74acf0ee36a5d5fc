"""General distillation on DeepSpeed: a masked-LM student learns from a cached transfer set
(top-k teacher distributions, masked positions) and optionally from an online teacher's internals.

Entry point: `python -m pretrain --config configs/pretrain_*.yaml` under deepspeed / torchrun / srun.
"""
