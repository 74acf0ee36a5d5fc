#!/usr/bin/env bash
# The one-command GPU check: bench/gpu.sh [flags of `python -m bench.gpu`, e.g. --batch 64 --seconds 30].
# Runs from the repository root with the project's Python (.venv/bin/python, or $PYTHON), offline; the table is
# printed and the JSON written to runs/bench/gpu_results.json unless --out says otherwise (an existing file needs
# --force). `bench/gpu.sh --dry-run` shows the plan on any machine; exit status as `python -m bench.gpu --help` says.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.gpu "$@"
