"""The training core every stage runs on (pretrain, finetune's runs and multi-task runs).

A stage supplies a `build_job(session) -> Job` (its modules, batches, evaluation and export) and calls
`loop.run(config, stage, build_job)`; the core owns the rest. What belongs here: anything every training stage
does the same way. Not here: the losses themselves (kdlib.losses) or how a student is shaped (kdlib.students).

  config.py           LoopConfig (steps, seed, cadence) and math_hash, the one definition of what changes the math
  deepspeed_engine.py EngineConfig -> DeepSpeed's JSON, and the DeepSpeed engine with our parameter groups
  checkpoints.py      checkpoints a kill cannot corrupt (`latest`, digests), loading at another world size,
                      ZeRO-3 consolidation
  lr_groups.py        AdamW parameter groups with layer-wise learning-rate decay
  providers.py        the provider table: every loss input name -> where it comes from
  objective_plan.py   one objective under what a stage offers: its scope, sites and checks, before training
  module.py           DistillModule: student (+ projections, peer) and the weighted objectives; BERT-EMD state
  progressive.py      MobileBERT's progressive transfer: which layers learn at each step
  internals.py        what a forward pass exposes to losses: logits, hidden states, pooled, Q/K/V and attention
  cross_tokenizer.py  batches of a student with its own tokenizer, aligned on character spans
  sampler.py          the deterministic, resumable distributed batch order (the same at any world size)
  batches.py          BatchStream: batches decoded and collated ahead on a background thread
  loop.py             run(config, stage, build_job): start -> build -> Trainer -> finish; Session, Job, Trainer
  state.py            trainer state and per-rank RNG states as JSON side files of a checkpoint
  preempt.py          SIGTERM / SIGUSR1 -> checkpoint at the step boundary -> exit 75
  early_stop.py       stopping on a held-out metric that no longer improves
  export.py           the student's weights out of the trained module

Modules are imported by name (`from kdlib.training.loop import ...`); this package imports nothing itself.
"""
