"""Which numerics a run computed with, and pinned CPU modes that make two CPUs compute the same bits.

Default float results differ between CPUs: ATen dispatches its CPU kernels by instruction set (AVX2,
AVX-512), and MKL and oneDNN choose code paths by CPU. On this project's embedded model the last bits
of the pretraining moved 01's held-out naming by 15 points (``../shared/repro_reference.md``). So every
run records a fingerprint (CPU model, instruction sets, threads, torch/MKL/oneDNN versions, the ATen
capability in use, the pinning variables, ``probe``'s hash, and ``kernel_hashes``: one hash per kernel
family), and ``runtime.numerics: pinned`` starts every kernel with ``PINNED_ENV``: ATen capped at AVX2,
MKL's conditional numerical reproducibility at AVX2, oneDNN's ISA at AVX2, MKL and OpenMP held to the
thread count asked for (no dynamic adjustment). They are read when torch
loads, so they are set for the notebook kernels and the GPTQModel child by the runner, before any of
them imports torch. MKL keeps its AVX2 branch on Intel CPUs only; ``portable`` puts it on its SSE2
branch, which AMD CPUs take too (``MODE_PINS``).

``probe`` is ``../shared/repro_probe.py``'s computation (an MLP trained 30 steps, and SDPA, on 2
threads), so its hash compares with the reference values measured on other machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

# MKL_DYNAMIC/OMP_DYNAMIC: MKL's guide asks for both to be FALSE besides MKL_CBWR for reproducible results "on
# different systems" (else MKL may run a call on fewer threads than asked, by its own judgement of the machine).
# Adding them left the probe, the kernel hashes and every artefact hash of a whole run as they were here (README).
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
# MKL honours its AVX2 branch on Intel CPUs only: "on non-Intel CPUs ... the AUTO branch is used instead" (oneMKL
# developer guide, conditional numerical reproducibility), and on an emulated AMD EPYC its vector math (exp, log, erf)
# and some GEMM shapes did part (medcomp.emulation; README, "Reproducibility"). Its COMPATIBLE branch (SSE2) is the
# one every x86 CPU takes, Intel or AMD, at about 2.7x the time of a GEMM on the AVX2 branch.
MODE_PINS = {"default": {}, "pinned": PINNED_ENV, "portable": {**PINNED_ENV, "MKL_CBWR": "COMPATIBLE"}}
# What each vendor's MKL does with the pins, measured on real machines (README, "Reproducibility"): on Intel CPUs
# MKL honours both branches; on an AMD EPYC its GEMM and exp/log/erf were the same bits pinned and by default (its
# own AVX2 path), and its COMPATIBLE branch agreed with Intel's for GEMMs and exp/log/erf but not for sqrt.
MKL_HONOURS_AVX2_BRANCH = {"intel": True, "amd": False}
# ``runtime.numerics: auto``. Intel: pinned, the fastest mode with published bits (the README's artefact hashes).
# AMD: default. There pinned is neither Intel's bits nor faster; portable's GEMMs are ~2.7x slower for bits that
# agree with Intel's portable run kernel by kernel (emulated EPYCs; on a real EPYC all but sqrt, which training
# no longer runs), a whole-run agreement not yet measured on a real AMD machine. The verdicts, counted over
# seeds, are the claim that holds on every machine. Elsewhere (ARM): default; the pins name x86 branches.
AUTO_MODE = {"intel": "pinned", "amd": "default", "other": "default"}
# The shared probe's hash on real machines (../shared/repro_reference.md), by the vendor and mode that gave it.
PUBLISHED_PROBES = {"cb523f34f6263620": ("intel", "pinned"), "ce2cbc17416fb7b6": ("intel", "portable"), "7caab138ffb226cd": ("intel", "default"),
                    "a74dd5ee4a369351": ("amd", "pinned"), "f1391541061d0d39": ("amd", "portable"), "7e63f6c88362cfb0": ("amd", "default")}
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """"intel", "amd" or "other", from the kernel's CPU description (MKL dispatches by the same vendor id)."""
    try:
        with open(cpuinfo) as handle:
            vendor = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("vendor_id")), "")
    except OSError:
        vendor = ""
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "other")


def resolve_mode(mode: str, vendor: str | None = None) -> str:
    """The mode a run computes in: ``mode`` itself, or for "auto" the mode ``AUTO_MODE`` gives this CPU's vendor."""
    if mode == "auto":
        return AUTO_MODE[vendor or cpu_vendor()]
    pinned_environment(mode)  # an unknown mode fails here, by name
    return mode


# Where whole-run artefact hashes are published, by the (vendor, mode) whose probe they go with.
PUBLISHED_ARTEFACTS = {("intel", "pinned"): "docs/reproducibility.md, 'Published bits'"}


def published_reference(probe_hash: str | None) -> str:
    """Which published bits a run can be compared with, from its probe's hash: the vendor and mode that gave the
    same probe on a real machine, and whether that pair has published artefact hashes; or that none did."""
    if probe_hash not in PUBLISHED_PROBES:
        return "none: no published probe has this hash, so this run's artefact hashes are its own (compare verdicts over seeds instead)"
    vendor, mode = PUBLISHED_PROBES[probe_hash]
    probe = f"the probe's published value on {'Intel' if vendor == 'intel' else 'AMD'} CPUs, {mode} (../shared/repro_reference.md)"
    if (vendor, mode) in PUBLISHED_ARTEFACTS:
        return f"{probe}; artefact hashes to compare with: {PUBLISHED_ARTEFACTS[(vendor, mode)]}"
    return f"{probe}; no artefact hashes are published for it"


def pinned_environment(mode: str) -> dict[str, str]:
    """The variables ``runtime.numerics`` asks for (``MODE_PINS``): the AVX2 pins when "pinned" (the same
    bits on Intel CPUs with AVX2), MKL's SSE2 branch besides when "portable" (on AMD CPUs too), none
    when "default"."""
    if mode not in MODE_PINS:
        raise ValueError(f"unknown numerics mode {mode!r}; known: {', '.join(MODE_PINS)}")
    return dict(MODE_PINS[mode])


def numerics_environment(mode: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) as a process computing in ``mode`` must start: the pins set
    when pinned, and removed when default (a "default" run's numbers must not be an earlier pinned
    run's, or a shell's left-over variable's)."""
    environment = {name: value for name, value in (os.environ if environ is None else environ).items() if name not in PINNED_ENV}
    return {**environment, **pinned_environment(mode)}


def set_for_children(mode: str) -> None:
    """Set this process's environment so that every process it starts computes in ``mode``."""
    for name in PINNED_ENV:
        os.environ.pop(name, None)
    os.environ.update(pinned_environment(mode))


@contextlib.contextmanager
def children_in(mode: str) -> Iterator[None]:
    """``set_for_children(mode)`` for the duration of a ``with`` block, then the pins as they were."""
    saved = active_pins()
    set_for_children(mode)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def in_mode(mode: str) -> bool:
    """Whether this process started with exactly ``mode``'s pins (torch reads them once, when it loads)."""
    return active_pins() == {name: pinned_environment(mode).get(name) for name in PINNED_ENV}


def active_pins() -> dict[str, str | None]:
    """The pinning variables as this process sees them (None: not set)."""
    return {name: os.environ.get(name) for name in PINNED_ENV}


def probe() -> tuple[float, str]:
    """The shared probe's loss and the first 16 hex digits of the sha256 of every bit it computed."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = torch.randn(256, 384)
    y = torch.randn(256, 384)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 384), torch.nn.LayerNorm(384))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(30):
        loss = ((model(x) - y) ** 2).mean() + torch.softmax(model(x) @ y.T / 20, -1).sum() * 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    attention = torch.nn.functional.scaled_dot_product_attention(torch.randn(2, 4, 64, 32), torch.randn(2, 4, 64, 32), torch.randn(2, 4, 64, 32))
    return float(f"{loss.item():.10f}"), _digest(*model.parameters(), attention)


def _digest(*tensors) -> str:
    """sha256 prefix of the tensors' bytes, any dtype (bf16 has no NumPy type: the bytes go through uint8)."""
    import torch

    data = b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    return hashlib.sha256(data).hexdigest()[:16]


def kernel_hashes(threads: int = 2) -> dict[str, str]:
    """Each family of CPU kernels the pipeline runs, on fixed inputs at the embedded model's shapes,
    hashed: where two CPUs (or two settings) part, which family parts.

    ``probe`` answers "the same bits or not" in one hash; this names the kernel behind a difference. Each
    family is a code path that dispatches by instruction set:
    - MKL's fp32 GEMM: a linear layer, and the batched products of attention scores;
    - the convolution of the CLIP patch embedding (oneDNN or ATen, as ATen picks);
    - ATen's vectorised norms and activations;
    - exp, log and erf, which ATen hands to MKL's vector math (VML);
    - softmax and cross-entropy (ATen);
    - SDPA (attention);
    - ATen's fp16 GEMM (GPTQModel's AWQ search runs in fp16);
    - ATen's int4 GEMM on bf16 activations (the AWQ/RTN layer that serves on the CPU);
    - bitsandbytes' nf4 (QLoRA's base, and the bnb variants).
    The inputs are seeded. The shapes are the embedded model's (hidden 576, MLP 1536, head 64, 32-pixel
    patches), so the kernels take the paths the run takes. On ``threads`` threads, as ``probe``: how a
    sum is split between threads changes its bits, and the runs use 2.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _kernel_hashes()
    finally:
        torch.set_num_threads(previous)


def _kernel_hashes() -> dict[str, str]:
    import torch

    torch.manual_seed(0)
    hidden, intermediate, tokens = 576, 1536, 117
    x = torch.randn(tokens, hidden)
    weight = torch.randn(intermediate, hidden) / hidden**0.5
    functional = torch.nn.functional
    hashes = {"fp32 linear (MKL GEMM)": _digest(functional.linear(x, weight))}
    q, k, v = (torch.randn(4, 9, 70, 64) for _ in range(3))
    hashes["fp32 attention scores (MKL batched GEMM)"] = _digest(q @ k.transpose(-1, -2), x @ x.T)
    images, patches = torch.randn(4, 3, 64, 64), torch.randn(192, 3, 32, 32) / 32
    hashes["conv2d (CLIP patch embedding)"] = _digest(functional.conv2d(images, patches, stride=32))
    hashes["norms, activations (ATen)"] = _digest(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), functional.silu(x),
                                                  functional.gelu(x), functional.layer_norm(x, (hidden,)))
    hashes["exp, log, erf (MKL VML)"] = _digest(x.exp(), x.abs().log(), torch.erf(x))
    logits = 4 * x[:, :tokens]  # elementwise, not a GEMM: a GEMM's difference would show here as well
    hashes["softmax, cross-entropy"] = _digest(logits.softmax(-1), functional.cross_entropy(logits, torch.arange(tokens)))
    hashes["attention (SDPA)"] = _digest(functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    hashes["fp16 linear (AWQ search)"] = _digest(functional.linear(x[:64].half(), weight.half()))
    levels = torch.randint(0, 16, (intermediate, hidden), dtype=torch.int32)
    scales_and_zeros = torch.stack([torch.rand(hidden // 64, intermediate) / 8 + 0.01, torch.randn(hidden // 64, intermediate) / 8], -1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
    hashes["int4 linear (AWQ serving)"] = _digest(torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 64,
                                                                                            scales_and_zeros.bfloat16()))
    hashes.update(_training_hashes(functional))
    try:
        import bitsandbytes

        quantized, state = bitsandbytes.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        hashes["nf4 (bitsandbytes)"] = _digest(quantized, bitsandbytes.matmul_4bit(x, quantized.t(), quant_state=state))
    except ImportError:  # the fingerprint still works where bitsandbytes is not installed
        pass
    return hashes


def _training_hashes(functional) -> dict[str, str]:
    """The kernels a training step runs besides the forward's, at the probe's shapes (256 x 384 -> 1024): the
    backward's GEMMs (transposed operands), autograd of the activations and norms, and AdamW's step. With these
    rows the fingerprint explains the probe: on an AMD EPYC under ``portable`` every forward row agreed with
    Intel's and the probe did not, because AdamW's default (foreach) step takes its square root through MKL's
    vector math, which keeps a branch of its own on AMD whatever ``MKL_CBWR`` asks (README, "Reproducibility")."""
    import torch

    torch.manual_seed(1)
    x, target = torch.randn(256, 384), torch.randn(256, 384)
    weight, upstream = torch.randn(1024, 384) / 20, torch.randn(256, 1024)
    hashes = {"fp32 GEMM, probe's shapes, forward and backward (MKL)": _digest(functional.linear(x, weight), upstream @ weight, upstream.T @ x)}
    leaf = x.clone().requires_grad_()
    norm = torch.nn.LayerNorm(384)
    loss = ((norm(functional.gelu(leaf)) - target) ** 2).mean()
    loss.backward()
    hashes["autograd: GELU, LayerNorm, mean (ATen)"] = _digest(loss, leaf.grad, norm.weight.grad, norm.bias.grad)
    hashes["sqrt (MKL VML)"] = _digest(torch.sqrt(x.abs()))
    for name, fused in (("AdamW step, foreach (the probe's; sqrt through MKL VML)", False), ("AdamW step, fused (training's)", True)):
        generator = torch.Generator().manual_seed(2)
        parameters = [torch.nn.Parameter(torch.randn(1024, 384, generator=generator)), torch.nn.Parameter(torch.randn(1024, generator=generator))]
        optimizer = torch.optim.AdamW(parameters, 1e-3, fused=fused)
        for _ in range(2):
            for parameter in parameters:
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        hashes[name] = _digest(*parameters)
    return hashes


def _cpu() -> tuple[str, list[str]]:
    model, flags = "unknown", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                present = set(line.split(":", 1)[1].split())
                flags = [flag for flag in ISA_FLAGS if flag in present]
    except OSError:
        pass
    return model, flags


def _library_versions() -> dict[str, str | None]:
    import torch

    config = torch.__config__.show()
    mkl = next((line.split("Version")[-1].strip(" :") for line in config.splitlines() if "Math Kernel Library" in line), None)
    onednn = next((line.split("MKL-DNN")[-1].strip(" :").split(" ")[0] for line in config.splitlines() if "MKL-DNN" in line or "oneDNN" in line), None)
    return {"torch": torch.__version__, "mkl": mkl, "onednn": onednn}


def fingerprint() -> dict[str, Any]:
    """This process's numerics: CPU, instruction sets, ATen's capability, threads, libraries, pins, probe."""
    import torch

    model, flags = _cpu()
    loss, digest = probe()
    return {"cpu": model, "vendor": cpu_vendor(), "instruction sets": flags, "torch threads": torch.get_num_threads(), **_library_versions(), "probe loss": loss,
            "probe hash": digest, **kernel_report()}


_MEASURED: dict[str, dict[str, Any]] = {}


def kernel_fingerprint(mode: str) -> dict[str, Any]:
    """``fingerprint`` as a notebook kernel of a run in ``mode`` sees it: measured in a fresh process
    started with the same environment, since the pins act only when torch loads.

    Measured once per mode in a process (a child that imports torch costs ~8 s; a sweep or a test
    starts many runs): the CPU, the libraries and the pins of a mode cannot change under a running
    process. A failure is not kept, so the next run measures again."""
    if mode in _MEASURED:
        return dict(_MEASURED[mode])
    env = numerics_environment(mode)
    result = subprocess.run([sys.executable, "-m", "medcomp.numerics"], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    _MEASURED[mode] = json.loads(result.stdout)
    return dict(_MEASURED[mode])


# The one file per stage whose bytes say whether two runs computed the same thing.
STAGE_ARTEFACTS = {
    "01_finetune": "stages/01_finetune/adapter/adapter_model.safetensors",
    "02_layer_importance": "stages/02_layer_importance/rankings.json",
    "03_prune": "answers/pruned-7.jsonl",
    "04_sft_pruned": "stages/04_sft_pruned/recovered-7/adapter/adapter_model.safetensors",
    "05_quantize": "answers/recovered-7-awq.jsonl",
    "07_judge": "stages/07_judge/tables/scores.csv",
}


def sha256_prefix(path: Path | str, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _location_free(value: Any) -> Any:
    """``value`` with every absolute path cut to its last three parts (``test/<disease folder>/x.jpg``,
    ``stages/01_finetune/merged``): where the run folder and the cache live is not what was computed."""
    if isinstance(value, dict):
        return {key: _location_free(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_location_free(item) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        return "/".join(Path(value).parts[-3:])
    return value


def artefact_digest(path: Path | str, length: int = 16) -> str:
    """sha256 prefix of what an artefact computed. JSON and JSON-lines files are hashed as their parsed
    content with absolute paths made location-free (answers name their image by path, 02's rankings its
    model), so two runs that computed the same thing in different folders or caches agree; other files
    (safetensors, CSV) by their bytes."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        return sha256_prefix(path, length)
    text = path.read_text(encoding="utf-8")
    content = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    canonical = json.dumps(_location_free(content), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def artefact_hashes(run_dir: Path | str) -> dict[str, str]:
    """``artefact_digest`` of each stage's main artefact that exists in ``run_dir`` (``STAGE_ARTEFACTS``)."""
    run_dir = Path(run_dir)
    return {stage: artefact_digest(run_dir / relative) for stage, relative in STAGE_ARTEFACTS.items() if (run_dir / relative).exists()}


def kernel_report() -> dict[str, Any]:
    """``kernel_hashes`` with what chose the kernels (ATen's capability, the pins): the part of the
    fingerprint an emulated CPU can afford (``medcomp.emulation``; the probe's 30 training steps take
    longer than 20 minutes there)."""
    import torch

    return {"aten capability": torch.backends.cpu.get_cpu_capability(), "pins": active_pins(), "kernel hashes": kernel_hashes()}


if __name__ == "__main__":  # ``kernel_fingerprint``'s child, and with ``kernels`` ``medcomp.emulation``'s
    print(json.dumps(kernel_report() if sys.argv[1:] == ["kernels"] else fingerprint()))
