#!/usr/bin/env bash
# Rehearse the Kaggle T4 path on any CUDA machine: kaggle_t4.yaml (only ids, paths and sizes changed) on
# a LLaVA-1.5-7B stand-in with the real depth (32 layers), fp16, llava-1.5's template and vision reading,
# every quantized dimension a multiple of 64; all eight stages, 07 against a judge on loopback.
# Prints each stage's peak CUDA memory beside the plan. Target: under 10 minutes on one GPU.
#   bash scripts/gpu_rehearsal.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this rehearsal is for a GPU (CI runs the same on the CPU)')"
exec "$python" -m medcomp rehearse --work "${1:-rehearsal}" --device cuda
