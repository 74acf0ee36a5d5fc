"""The training core every stage runs on (pretrain today, finetune next).

A stage supplies its config (inheriting `config.LoopConfig`), its modules, its batches, its evaluation
and its export; the core owns the rest:

  config.py    LoopConfig (steps, seed, cadence) and math_hash, the one definition of what changes the math
  inputs.py    the provider table: every loss input name -> where it comes from, checked before training
  module.py    DistillModule: student (+ projections, peer) and the weighted objectives; BERT-EMD state
  internals.py what a forward pass exposes to losses: logits, hidden states, pooled, Q/K/V and attention
  sampler.py   the deterministic, resumable distributed batch order
  batches.py   BatchStream: batches decoded and collated ahead on a background thread
  loop.py      start() -> Session, Job, Trainer (state_dict / load_state_dict), train()
  state.py     trainer state and per-rank RNG states as JSON side files of a checkpoint
  preempt.py   SIGTERM / SIGUSR1 -> checkpoint at the step boundary -> exit 75
  export.py    the student's weights out of the trained module

Modules are imported by name (`from kdlib.training.loop import ...`); this package imports nothing itself.
"""
