"""Rehearse the Kaggle T4 path: ``kaggle_t4.yaml`` end to end on the 32-layer fp16 stand-in.

Only ids, paths and sizes change from the preset (``STANDIN_SIZES``: fewer test images, steps and
tokens). 07 runs the ``openai`` backend against ``LoopbackJudge``, an OpenAI-compatible server on
127.0.0.1 whose rating follows the answer's overlap with the reference, so the key path (a key read
from the environment, sent as a header, written nowhere) is exercised for real. CI runs it on the CPU
(``tests/test_end_to_end.py``); ``scripts/gpu_rehearsal.sh`` runs it on any CUDA machine and prints
each stage's peak CUDA memory beside the plan's.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from medcomp.params import PRESETS_DIR, merge_overrides

STANDIN_SIZES: dict[str, Any] = {
    "run_name": "t4-standin",
    "data": {"test_images": 6, "validation_per_disease": 1},  # 1 of the 3 train images a disease held out
    "finetune": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 50},
    "evaluation": {"max_new_tokens": 6, "sample_answers": 2},
    "importance": {"calibration_size": 3, "max_new_tokens": 3},
    "recovery": {"finetune": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 50}},
    "quantization": {"calibration_size": 2},
    "benchmark": {"new_tokens": 3, "repeats": 1},
    "judge": {"concurrency": 4, "timeout_seconds": 30, "bootstrap_samples": 200},
}


# 05's cells when GPTQModel is absent (scripts/kaggle_install.sh without --awq): bitsandbytes and the QLoRA deployment
BNB_ONLY = {"finetuned": ["bnb"], "pruned": [], "recovered": ["bnb"], "pipeline_ablations": [], "recovered_magnitude": []}
# 08's adapters train on 05's AWQ grid and its GPTQ is GPTQModel's: without it, 08 keeps the QLoRA deployments, distillation and SLEB
BEYOND_BNB_ONLY = {"qalora": False, "lora_on_grid": False, "gptq": False, "quantize_then_recover": []}


def rating_by_overlap(user_message: str) -> int:
    """4 when the answer shares a word with the reference, else 1: ratings that differ between variants."""
    answer = user_message.split("Answer:", 1)[1].split("\nReference:", 1)[0].lower().split()
    reference = user_message.split("Reference:", 1)[1].lower().split()
    return 4 if set(answer) & set(reference) else 1


class LoopbackJudge:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1 (a free port); records each request's
    headers. ``with LoopbackJudge() as judge: ... judge.url``."""

    def __init__(self, port: int = 0):
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}})
                rating = rating_by_overlap(body["messages"][-1]["content"])
                reply = {"id": "r", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": json.dumps({"Evaluation": "loopback", "Rating": rating})}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "LoopbackJudge":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_standin_params(target: Path, standin: Path, data_root: Path, judge_url: str, device: str = "auto", extra: dict | None = None) -> Path:
    """``kaggle_t4.yaml`` with the stand-in's path, the data root, the judge's URL, the device and the sizes changed."""
    import torch

    raw = yaml.safe_load((PRESETS_DIR / "kaggle_t4.yaml").read_text())
    # the preset's two T4s where this machine has them; a one-GPU machine rehearses the split-free load
    gpus = min(raw["model"].get("gpus", 1), torch.cuda.device_count()) if device != "cpu" and torch.cuda.is_available() else raw["model"].get("gpus", 1)
    overrides = merge_overrides(STANDIN_SIZES, {"model": {"id": str(standin), "device": device, "gpus": max(1, gpus)}, "data": {"root": str(data_root)},
                                                "judge": {"base_url": judge_url}})
    if importlib.util.find_spec("gptqmodel") is None:  # kaggle_install.sh without --awq: 05 runs what that install allows
        print("[rehearsal] GPTQModel is not installed: 05 quantizes with bitsandbytes only (no AWQ, no round-to-nearest)")
        overrides = merge_overrides(overrides, {"quantization": BNB_ONLY, "beyond": BEYOND_BNB_ONLY})
    target.write_text(yaml.safe_dump(merge_overrides(merge_overrides(raw, overrides), extra or {})))
    return target


def peaks_beside_plan(run_dir: Path, params) -> "pd.DataFrame":  # noqa: F821
    """Each stage's planned peak (the stand-in's own config) beside the peak its notebook measured."""
    import pandas as pd

    from medcomp import plan
    from medcomp.runs import Run

    run = Run(run_dir)
    shape = plan.shape_for_params(params)
    rows = []
    for stage_plan in plan.stage_plans(params, shape):
        measured = run.summary(stage_plan.stage)
        per_gpu = [measured[key] for key in sorted(measured) if key.startswith("peak GPU ") and key != "peak GPU memory (GiB)"]
        rows.append({"stage": stage_plan.stage, "step": stage_plan.step, "planned peak (GiB)": round(stage_plan.peak_bytes / plan.GIB, 3),
                     "planned per GPU (GiB)": " / ".join(f"{peak / plan.GIB:.3f}" for peak in stage_plan.gpu_peaks),
                     "measured peak GPU memory (GiB)": measured.get("peak GPU memory (GiB)", "—"),
                     "measured per GPU (GiB)": " / ".join(map(str, per_gpu)) or "—",
                     "measured peak RAM (GiB)": measured.get("peak RAM (GiB)", "—")})
    return pd.DataFrame(rows).set_index(["stage", "step"])


def environment_report(device: str) -> list[str]:
    """What a first run on a new GPU machine must say before anything else: torch and its CUDA build, the
    driver, each GPU's name, memory and compute capability, and the AWQ/RTN kernel chosen (with its build
    time, and the kernels refused with their reason)."""
    import subprocess

    import torch

    from medcomp.backends import awq_backend
    from medcomp.loading import resolve_device

    lines = [f"[rehearsal] torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"]
    if torch.cuda.is_available():
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=30).stdout.split("\n")[0].strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            driver = "unknown (no nvidia-smi)"
        lines.append(f"[rehearsal] NVIDIA driver {driver}")
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            lines.append(f"[rehearsal] cuda:{index} {properties.name}, {properties.total_memory / 2**30:.1f} GiB, "
                         f"compute capability {properties.major}.{properties.minor}")
    try:
        lines.append(f"[rehearsal] {awq_backend(resolve_device(device)).summary()}")
    except Exception as error:  # noqa: BLE001  said here, and 05 fails on it with the same words
        lines.append(f"[rehearsal] no AWQ/RTN kernel: {type(error).__name__}: {error}")
    return lines


def rehearse(work_dir: Path, device: str = "auto") -> int:
    """Build the stand-in and its data in ``work_dir``, run all eight stages, print peaks beside the plan."""
    import os
    import time

    from medcomp.params import load_params
    from medcomp.runner import run_pipeline
    from medcomp.standin import build_llava15_standin
    from medcomp.synthetic import generate_dermnet_like

    work_dir = Path(work_dir)
    standin = work_dir / "standin"
    if not (standin / "config.json").exists():
        build_llava15_standin(standin)
    data = work_dir / "dermnet"
    if not (data / "train").exists():
        generate_dermnet_like(data, train_per_disease=3, test_per_disease=2, image_size=32, seed=1)
    os.environ.setdefault("OPENAI_API_KEY", "rehearsal-key-not-a-secret")
    print("\n".join(environment_report(device)), flush=True)
    started = time.perf_counter()
    with LoopbackJudge() as judge:
        params_path = write_standin_params(work_dir / "t4-standin.yaml", standin, data, judge.url, device)
        outcomes = run_pipeline(params_path, run_dir=work_dir / "run")
    print(peaks_beside_plan(work_dir / "run", load_params(params_path)).to_string())
    print(f"[rehearsal] {sum(o.status == 'ok' for o in outcomes)} of {len(outcomes)} stages ok in {time.perf_counter() - started:.0f} s; "
          f"reports in {work_dir / 'run'}")
    return 0 if all(o.status in ("ok", "reused") for o in outcomes) else 1
