"""The AWQ/RTN serving kernel is chosen by compute capability, warmed once, and falls back with its reason."""

from __future__ import annotations

import re
import shutil

import pytest

from medcomp import backends


@pytest.fixture
def warmed(monkeypatch):
    """Replace the extension builds by records of the calls; a name in ``failing`` raises as a failed build does."""
    calls, failing = [], {}

    def warmer(name):
        def warm():
            calls.append(name)
            if name in failing:
                raise RuntimeError(failing[name])
        return warm

    monkeypatch.setattr(backends, "WARMERS", {name: warmer(name) for name in ("marlin", "exllama_v2")})
    return calls, failing


def test_a_t4_gets_exllama_v2_and_an_ampere_or_newer_gpu_gets_marlin(warmed):
    calls, _ = warmed
    t4 = backends.choose_awq_backend("cuda:0", capability=(7, 5))
    assert (t4.backend, t4.refused, calls) == ("exllama_v2", [], ["exllama_v2"])
    assert "7.5 >= 7.5" in t4.reason and "exllama_v2" in t4.summary() and "compute capability 7.5" in t4.summary()
    for capability in ((8, 0), (8, 9), (9, 0)):
        assert backends.choose_awq_backend("cuda:1", capability=capability).backend == "marlin"
    assert backends.choose_awq_backend("cuda", capability=(7, 0)).backend == backends.TORCH_BACKEND  # V100: no extension kernel
    assert backends.choose_awq_backend("cpu").backend == backends.CPU_BACKEND


def test_a_kernel_that_fails_to_build_is_skipped_with_its_reason(warmed):
    calls, failing = warmed
    failing["exllama_v2"] = "Error building extension 'gptqmodel_exllamav2_awq_ops'\nnvcc fatal: Unsupported gpu architecture 'compute_75'"
    choice = backends.choose_awq_backend("cuda:0", capability=(7, 5))
    assert choice.backend == backends.TORCH_BACKEND
    assert choice.refused == [("exllama_v2", "RuntimeError: nvcc fatal: Unsupported gpu architecture 'compute_75'")]
    assert "exllama_v2 refused: RuntimeError: nvcc fatal" in choice.summary()
    del failing["exllama_v2"]
    failing["marlin"] = "Marlin kernel only supports compute capability >= 8.0."
    assert backends.choose_awq_backend("cuda:0", capability=(8, 0)).backend == "exllama_v2"  # the next that builds


def test_the_chosen_kernel_reaches_transformers_and_the_torch_kernel_is_the_fallback(monkeypatch, warmed, tmp_path):
    """load_quantized asks transformers for the chosen backend by name, and retries with the plain-torch kernel
    when the chosen one fails at load, with a warning naming both."""
    import json

    import transformers

    from medcomp import loading

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64}}))
    asked = []

    class FakeModel:
        def eval(self):
            return self

    def from_pretrained(path, **kwargs):
        asked.append(kwargs["quantization_config"].backend)
        if asked[-1] == "exllama_v2":
            raise RuntimeError("q_matrix build failed")
        return FakeModel()

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(loading, "assert_decoder_quantized", lambda model: None)
    monkeypatch.setattr(loading, "awq_backend", lambda device: backends.choose_awq_backend(device, capability=(7, 5)))
    with pytest.warns(UserWarning, match="exllama_v2 failed to load.*q_matrix build failed.*falling back to torch_awq"):
        loading.load_quantized(tmp_path, device="cuda:0", dtype="float16")
    assert asked == ["exllama_v2", "torch_awq"]
    asked.clear()
    loading.load_quantized(tmp_path, device="cpu", dtype="float32")
    assert asked == ["torch_fused_awq"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA toolkit's nvcc (this project's machine image has 13.0)")
def test_the_t4_kernel_compiles_for_sm_75_with_gptqmodels_own_sources(tmp_path):
    """GPTQModel ships no prebuilt kernels: a T4 compiles ExLlamaV2's AWQ extension on first use. Building it
    here for sm_75, with no GPU, makes a GPTQModel upgrade that breaks the T4's kernel fail in CI."""
    import torch

    seconds = backends.compile_for_arch("7.5", str(tmp_path))
    assert set(re.findall(r"-gencode=\S+", (tmp_path / "build.ninja").read_text())) == {"-gencode=arch=compute_75,code=sm_75"}
    torch.ops.load_library(str(next(tmp_path.glob("*.so"))))  # its ops register without a GPU
    assert "Tensor" in str(torch.ops.gptqmodel_exllamav2_awq.gemm_half_q_half_awq.default._schema)
    assert seconds > 0


def test_the_rehearsal_says_driver_build_capabilities_and_kernel_first(monkeypatch, warmed):
    """On Kaggle's two T4s (simulated: torch.cuda and nvidia-smi answer as there), the rehearsal's first lines
    name the driver, the CUDA build, each GPU's compute capability and the kernel chosen for it."""
    import subprocess
    import types

    import torch

    from medcomp import rehearsal

    monkeypatch.setattr(backends, "_CHOSEN", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0, "550.90.07\n550.90.07\n", ""))
    lines = rehearsal.environment_report("cuda")
    assert lines[1] == "[rehearsal] NVIDIA driver 550.90.07"
    assert lines[2:4] == [f"[rehearsal] cuda:{i} Tesla T4, 15.0 GiB, compute capability 7.5" for i in (0, 1)]
    assert lines[4].startswith("[rehearsal] AWQ/RTN kernel on cuda (compute capability 7.5): exllama_v2")


@pytest.mark.parametrize("capability", [(7, 5), (8, 0)])
def test_the_awq_search_runs_on_the_gpu_asked_in_fp16_whatever_its_capability(monkeypatch, capability):
    """GPTQModel's AWQ search is configured for the GPU 05 runs on and searches in fp16, the dtype a T4 has
    (no bf16 arithmetic at 7.5); RTN the same."""
    from pathlib import Path

    import torch

    from medcomp import quantizers

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    seen = []
    monkeypatch.setattr(quantizers, "_gptqmodel_quantize",
                        lambda source, target, config, conversations: seen.append((str(config.device), quantizers.search_dtype(config.device))) or 1.0)
    quantizers.quantize_awq("source", Path("target"), [{"image": "x"}], device="cuda:0")
    quantizers.quantize_rtn("source", Path("target"), [{"image": "x"}], device="cuda:0")
    assert [dtype for _, dtype in seen] == [torch.float16, torch.float16] and all("cuda" in device for device, _ in seen), seen
