"""Which 4-bit kernel serves AWQ/RTN checkpoints on a device: chosen by compute capability, warmed once, with a fallback.

Left to transformers' automatic choice, GPTQModel tries its AWQ kernels in a fixed order (Swordfish, Machete,
Marlin, ExLlamaV2, GEMM, Triton, Torch), and on a T4 (compute capability 7.5) a working kernel is reached only
if every kernel before it is refused by its own check. The GEMM kernel's extension does not compile for sm_75
("BFloat16 AWQ GEMM requires CUDA_ARCH >= 800", issue 28): so the choice is made here, from the capability,
and a candidate that fails to build or load is skipped with its reason:
- capability >= 8.0 (A100, L4, H100): Marlin, the fastest, then ExLlamaV2, then the plain-torch kernel;
- 7.5 (T4): ExLlamaV2, whose CUDA extension builds for sm_75 (``compile_for_arch`` proves it in CI), then
  the plain-torch kernel (dequantize and matmul: correct everywhere, slower);
- the CPU: GPTQModel's ``torch_fused_awq`` (ATen's int4 kernel; the default layer de-packs every weight on
  every forward, about 45x slower here).
Below 7.5 no CUDA kernel is supported: the plain-torch kernel only.

GPTQModel compiles its CUDA kernels on first use (ninja, nvcc, the CUDA headers), cached under
``~/.cache/gptqmodel``: ``choose_awq_backend`` does it once, before the first model loads, and reports the time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

CPU_BACKEND = "torch_fused_awq"
TORCH_BACKEND = "torch_awq"  # no extension: runs wherever torch does
# (lowest capability, candidates in order); the first row whose capability the device reaches applies
CUDA_BACKENDS: tuple[tuple[tuple[int, int], tuple[str, ...]], ...] = (
    ((8, 0), ("marlin", "exllama_v2", TORCH_BACKEND)),
    ((7, 5), ("exllama_v2", TORCH_BACKEND)),
    ((0, 0), (TORCH_BACKEND,)),
)


@dataclass
class BackendChoice:
    """The kernel chosen for a device, why, how long its warm-up (a first-use compile) took, and what was refused."""

    device: str
    capability: tuple[int, int] | None
    backend: str
    reason: str
    warm_seconds: float = 0.0
    refused: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        refused = "".join(f"; {name} refused: {why}" for name, why in self.refused)
        where = f"{self.device} (compute capability {'.'.join(map(str, self.capability))})" if self.capability else self.device
        return f"AWQ/RTN kernel on {where}: {self.backend} ({self.reason}), warmed in {self.warm_seconds:.1f} s{refused}"


def candidates(device: str, capability: tuple[int, int] | None = None) -> tuple[tuple[str, ...], str]:
    """The kernels to try on ``device``, best first, and why these."""
    if not str(device).startswith("cuda"):
        return (CPU_BACKEND,), "the CPU: ATen's int4 kernel"
    capability = capability or torch.cuda.get_device_capability(torch.device(device))
    for lowest, names in CUDA_BACKENDS:
        if capability >= lowest:
            return names, f"compute capability {capability[0]}.{capability[1]} >= {lowest[0]}.{lowest[1]}"
    raise AssertionError("CUDA_BACKENDS ends with (0, 0)")


def _warm_marlin() -> None:
    from gptqmodel.utils.marlin import marlin_runtime_error, prewarm_marlin_extension

    if not prewarm_marlin_extension(torch.float16):  # the real path serves in fp16
        raise RuntimeError(marlin_runtime_error(torch.float16))


def _warm_exllama_v2() -> None:
    from gptqmodel.utils.exllamav2 import exllamav2_awq_runtime_error, prewarm_exllamav2_awq_extension

    if not prewarm_exllamav2_awq_extension():
        raise RuntimeError(exllamav2_awq_runtime_error())


# How each backend is made ready: its extension built (or loaded from GPTQModel's cache). The others need nothing.
WARMERS: dict[str, Callable[[], None]] = {"marlin": _warm_marlin, "exllama_v2": _warm_exllama_v2}


def choose_awq_backend(device: str, capability: tuple[int, int] | None = None) -> BackendChoice:
    """The first candidate for ``device`` whose kernel builds and loads, warmed; the refused ones with their reason."""
    names, reason = candidates(device, capability)
    if str(device).startswith("cuda"):
        capability = capability or torch.cuda.get_device_capability(torch.device(device))
    refused: list[tuple[str, str]] = []
    for name in names:
        started = time.perf_counter()
        try:
            if name in WARMERS:
                WARMERS[name]()
        except Exception as error:  # noqa: BLE001  a kernel that fails to build is skipped, with its reason
            refused.append((name, f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200] if str(error).strip() else ''}"))
            continue
        return BackendChoice(str(device), capability, name, reason if not refused else f"{reason}; the first that built",
                             round(time.perf_counter() - started, 1), refused)
    raise RuntimeError(f"no AWQ kernel works on {device}: " + "; ".join(f"{name}: {why}" for name, why in refused))


_CHOSEN: dict[str, BackendChoice] = {}


def awq_backend(device: str) -> BackendChoice:
    """``choose_awq_backend`` once per device and process: the warm-up is a compile the first time."""
    if str(device) not in _CHOSEN:
        _CHOSEN[str(device)] = choose_awq_backend(device)
    return _CHOSEN[str(device)]


def _toolkit() -> str:
    """The CUDA toolkit's folder (the one with ``include/crt/host_config.h``): $CUDA_HOME's, the nvcc on PATH's
    (resolved through a link), or /usr/local/cuda's."""
    import os
    import shutil
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    places = [os.environ.get("CUDA_HOME"), nvcc and str(Path(os.path.realpath(nvcc)).parents[1]), "/usr/local/cuda"]
    for place in filter(None, places):
        if (Path(place) / "include" / "crt" / "host_config.h").exists():
            return str(Path(place))
    raise RuntimeError("no CUDA toolkit found (nvcc on PATH, $CUDA_HOME or /usr/local/cuda with include/crt/host_config.h): "
                       "compiling a CUDA kernel needs one (pip: nvidia-cuda-nvcc)")


def compile_for_arch(arch: str, build_directory: str) -> float:
    """Build GPTQModel's ExLlamaV2 AWQ extension for ``arch`` (e.g. "7.5") with its own sources and flags, no GPU
    needed; returns the seconds it took. A GPTQModel upgrade that breaks the T4's kernel fails here, in CI."""
    import os

    import torch.utils.cpp_extension as cpp_extension
    from gptqmodel.utils.exllamav2 import _EXLLAMAV2_AWQ_TORCH_OPS_EXTENSION as extension

    def resolved(value) -> list[str]:
        return list(value() if callable(value) else (value or []))

    toolkit = _toolkit()
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    started = time.perf_counter()
    try:
        cpp_extension.load(name=f"medcomp_exllamav2_awq_sm{arch.replace('.', '')}", sources=resolved(extension.sources),
                           extra_cflags=resolved(extension.extra_cflags), extra_cuda_cflags=resolved(extension.extra_cuda_cflags),
                           # nvcc's own headers first: the host compiler otherwise meets the pip CUDA headers' include of
                           # crt/host_config.h, which only a CUDA toolkit has
                           extra_include_paths=[f"{toolkit}/include", *resolved(extension.extra_include_paths)],
                           extra_ldflags=[f"-L{toolkit}/lib64", *resolved(extension.extra_ldflags)],
                           build_directory=build_directory, is_python_module=False)
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return time.perf_counter() - started
