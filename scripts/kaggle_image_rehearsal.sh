#!/usr/bin/env bash
# Kaggle's image, rehearsed on any machine: a Python 3.12 venv holding what Kaggle's GPU image holds before a
# user installs anything (torch 2.10.0, PyPI's CUDA 12.8 build; protobuf 5.29; transformers 5.23; accelerate
# 1.15), then scripts/kaggle_install.sh exactly as a user runs it, then the 32-layer fp16 stand-in through
# 01-08 (05 with what that install allows: bitsandbytes, since GPTQModel needs torch >= 2.14.1).
# It prints the versions it ran with. CI runs it (tests/test_kaggle_image.py); on a GPU it rehearses CUDA too.
#   bash scripts/kaggle_image_rehearsal.sh [WORK_DIR] [--device cpu|cuda|auto]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-kaggle-rehearsal}"
device="${2:-cpu}"
venv="${KAGGLE_VENV:-.kaggle-venv}"
KAGGLE_IMAGE="torch==2.10.0 protobuf==5.29.6 transformers==5.23.0 accelerate==1.15.0"
python312=""
for candidate in "${PYTHON312:-}" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null) $(command -v python3.12 || true); do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then python312=$candidate; break; fi
done
if [ -z "$python312" ]; then
  echo "[kaggle-image] no Python 3.12 (Kaggle's): install one (pyenv install 3.12) or put python3.12 on PATH" >&2
  exit 2
fi
stamp="$venv/.kaggle-image-$(echo "$KAGGLE_IMAGE" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  started=$(date +%s)
  rm -rf "$venv"
  "$python312" -m venv "$venv"
  # shellcheck disable=SC2086  # the image's packages, one word each
  if [ -x .venv/bin/uv ]; then .venv/bin/uv pip install --quiet --python "$venv/bin/python" $KAGGLE_IMAGE pip
  else "$venv/bin/pip" install --quiet $KAGGLE_IMAGE; fi
  touch "$stamp"
  echo "[kaggle-image] image built in $(( $(date +%s) - started )) s: $KAGGLE_IMAGE"
fi
started=$(date +%s)
PYTHON="$venv/bin/python" bash scripts/kaggle_install.sh
echo "[kaggle-image] kaggle_install.sh took $(( $(date +%s) - started )) s"
"$venv/bin/python" - <<'PY'
import platform
from importlib.metadata import version
names = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "protobuf", "medcomp"]
print("[kaggle-image] Python " + platform.python_version() + "; " + ", ".join(f"{n} {version(n)}" for n in names))
PY
exec "$venv/bin/python" -m medcomp rehearse --work "$work" --device "$device"
