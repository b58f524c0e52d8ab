"""The three 4-bit weight-only quantizers of the paper's section 3.4, group size 64.

The vision tower, projector, embeddings and lm_head stay in full precision.

- **AWQ** (``quantize_awq``): GPTQModel's activation-aware scale search (Eq. 6-8) on calibration
  conversations (``medcomp.calibration``). Saved in AWQ's GEMM format; transformers reloads it through
  GPTQModel (``medcomp.loading.load_quantized``).
- **Round-to-nearest** (``quantize_rtn``): GPTQModel's RTN, asymmetric min-max per group of 64, in the
  same GEMM storage as AWQ, minus the search.
- **bitsandbytes** nf4 (``quantize_bnb``): quantized at load, blocks of 64, and saved 4-bit.

GPTQModel runs in a child process (``python -m medcomp.quantizers SPEC``); see ``_quantize_in_child``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medcomp.calibration import check_finite_activations, describe_conversation, with_images_loaded
from medcomp.costs import operation
from medcomp.files import atomic_directory, atomic_write_json
from medcomp.int4 import from_quantized_checkpoint, save_int4
from medcomp.loading import FULL_PRECISION_MODULES, QuantizationError, bnb_4bit_config, checkpoint_identity, import_gptqmodel_quietly, load_llava, load_processor, release_accelerator_memory


RECORD = "quantization.json"


def search_dtype(device) -> torch.dtype:
    """The dtype GPTQModel's AWQ, GPTQ and RTN searches run in: float32 on the CPU, float16 on a GPU.

    A T4 (compute capability 7.5) has no bfloat16 arithmetic, and fp16 serves every GPU the same. On the CPU fp16
    matrix products run about 50× slower than fp32 (this machine's measured GEMM peaks: docs/performance.md), and
    the search is mostly matrix products: fp32 there. What is stored does not change with it: GPTQModel packs the
    scales in fp16 whatever the search ran in (``AwqTorchLinear.pack``; GPTQ's ``scales.to(float16)``), and the
    codes are rounded against those fp16 scales (tested: ``test_a_cpu_search_runs_in_fp32_and_stores_fp16_scales``).
    The search's own arithmetic differs from a T4's: docs/reproducibility.md."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def _allow_fp32_awq_packing() -> None:
    """Let GPTQModel's AWQ packing class take an fp32 model. Its only fp16/bf16 restriction is a declared list
    (``SUPPORTS_DTYPES``) checked when the packed module is created; ``pack`` itself casts the scales to fp16 and
    rounds the codes against them. Only in the quantizer's child process, which exists for this one job."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    if torch.float32 not in AwqTorchLinear.SUPPORTS_DTYPES:
        AwqTorchLinear.SUPPORTS_DTYPES = [*AwqTorchLinear.SUPPORTS_DTYPES, torch.float32]


def awq_best_clip(processor, w: torch.Tensor, input_feat: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5,
                  n_sample_token: int = 512) -> torch.Tensor:
    """GPTQModel's ``AWQProcessor._compute_best_clip`` (7.7; AutoAWQ's ``auto_clip``) with its two reconstructions
    as matrix products: the same grid, candidates, errors and choice.

    Why: GPTQModel forms each group's output as ``(input_feat * w).sum(-1)``, an elementwise product of
    ``[out, tokens, groups, 64]`` elements, 10 times per batch of 256 output channels. Here that was 55 % of an
    AWQ search (py-spy: 61 of 111 s for the embedded model on 8 calibration conversations), spent moving memory,
    not computing. ``einsum("tgk,ogk->otg")`` is a batched GEMM over groups with the same products; only the order
    of the 64-term sums differs (tested against the library's own method: ``test_awq_clip_search_matches_gptqmodels``).
    """
    assert w.dim() == 2
    out_features, in_features = w.shape
    group_size = processor.qcfg.group_size if processor.qcfg.group_size > 0 else in_features
    feat = input_feat.reshape(-1, in_features)
    feat = feat[:: max(1, feat.shape[0] // n_sample_token)].reshape(-1, in_features // group_size, group_size)  # [t, g, k]
    feat = feat.to(w.device)
    w_all = w.reshape(out_features, 1, -1, group_size)
    batch = 256 if out_features % 256 == 0 else 64
    assert out_features % batch == 0
    scratch_clamp = torch.empty_like(w_all[:batch])
    scratch_quant = torch.empty_like(scratch_clamp)
    best = []
    for start in range(0, out_features, batch):
        w_batch = w_all[start:start + batch]
        org_max_val = w_batch.abs().amax(dim=-1, keepdim=True)  # [o, 1, g, 1]
        errors, max_vals = [torch.full_like(org_max_val, float("inf"))], [org_max_val]
        org_out = torch.einsum("tgk,ogk->otg", feat, w_batch[:, 0])
        for shrink in range(int(max_shrink * n_grid)):
            max_val = org_max_val * (1 - shrink / n_grid)
            torch.clamp(w_batch, -max_val, max_val, out=scratch_clamp[: w_batch.shape[0]])
            processor._pseudo_quantize_tensor_into(scratch_clamp[: w_batch.shape[0]], scratch_quant[: w_batch.shape[0]], abs_max=max_val)
            current = torch.einsum("tgk,ogk->otg", feat, scratch_quant[: w_batch.shape[0], 0])
            errors.append(current.sub_(org_out).pow_(2).mean(dim=1).view(org_max_val.shape))
            max_vals.append(max_val)
        index = torch.stack(errors, dim=0).nan_to_num(nan=torch.inf).argmin(dim=0)
        best.append(torch.gather(torch.stack(max_vals, dim=0), dim=0, index=index.unsqueeze(0)).squeeze(0))
    return torch.cat(best, dim=0).squeeze(1)


def _fast_awq_clip_search() -> None:
    """Serve GPTQModel's AWQ clip search by ``awq_best_clip``: in the quantizer's child process only."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    if not hasattr(AWQProcessor, "library_compute_best_clip"):  # the library's own, kept for the test that compares them
        AWQProcessor.library_compute_best_clip = AWQProcessor._compute_best_clip
    AWQProcessor._compute_best_clip = torch.inference_mode()(awq_best_clip)


def _gptqmodel_quantize(source: str, target: Path, config, conversations, as_int4: bool = False) -> float:
    """Run GPTQModel in this process (``quantize`` runs it in a child process; see there). AWQ and RTN are saved
    in AWQ's GEMM format; GPTQ in its own, converted losslessly into ``medcomp.int4`` (transformers loads GPTQ
    only through optimum, which this project does not install; the int4 format serves on the same kernel as AWQ)."""
    import tempfile

    import_gptqmodel_quietly()
    from gptqmodel import GPTQModel

    started = time.perf_counter()
    dtype = search_dtype(config.device)
    if dtype == torch.float32:
        _allow_fp32_awq_packing()
    _fast_awq_clip_search()
    with operation(f"{type(config).__name__.removesuffix('Config')} search ({Path(target).name})", "search", str(dtype).removeprefix("torch.")):
        model = GPTQModel.load(source, config, dtype=dtype)
        model.quantize(with_images_loaded(conversations), batch_size=1)
    seconds = time.perf_counter() - started
    if as_int4:
        Path(target).parent.mkdir(parents=True, exist_ok=True)  # a scratch_dir's stage folder may not exist yet
        with tempfile.TemporaryDirectory(dir=Path(target).parent) as scratch:
            model.save(scratch)
            del model
            save_int4(from_quantized_checkpoint(scratch, "float32"), load_processor(source), target)
        return seconds
    with atomic_directory(target) as staging:
        model.save(str(staging))
        _record_as_awq_gemm(staging)
    del model
    return seconds


def _quantize_in_child(method: str, source: str, target: Path, conversations, group_size: int, device: str) -> float:
    """Run ``quantize_awq``/``quantize_rtn`` in a child Python process.

    GPTQModel's logger draws progress through its own stdout wrappers and notebook display handles
    (no redirect catches them: they leave pages of blank output in a report), and a failure in one
    of its worker threads can end the whole process, which in a notebook is the kernel. A child keeps
    both away from the notebook; its output is kept, and shown if it fails.
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch) / "spec.json"
        result = Path(scratch) / "seconds.json"
        spec.write_text(json.dumps({"method": method, "source": str(source), "target": str(target), "conversations": conversations,
                                    "group_size": group_size, "device": device, "threads": torch.get_num_threads(), "result": str(result)}))
        # cwd: GPTQModel writes a log folder into the working directory
        child = subprocess.run([sys.executable, "-m", "medcomp.quantizers", str(spec)], capture_output=True, text=True, cwd=scratch)
        if child.returncode != 0 or not result.exists() or not (Path(target) / "config.json").exists():
            tail = "\n".join((child.stdout + child.stderr).strip().splitlines()[-25:])
            raise QuantizationError(f"{method} quantization of {source} failed (exit code {child.returncode}):\n{tail}")
        return float(json.loads(result.read_text()))


def _record_as_awq_gemm(directory: Path) -> None:
    """Write the checkpoint's ``quantization_config`` as what it stores: AWQ GEMM tensors.

    GPTQModel's RTN writes the GEMM layout (``qweight``/``qzeros``/``scales``, AWQ's packing) but
    records ``quant_method: "gptq"``, which transformers refuses (``Unsupported format: FORMAT.GEMM
    for quantization method METHOD.GPTQ``). RTN is AWQ with every scale 1 and no clipping, so the same
    record is right for both. The full-precision modules are listed, or transformers converts them too.
    """
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    quantization = config["quantization_config"]
    if quantization.get("format") != "gemm":
        raise QuantizationError(f"expected GEMM-format tensors in {directory}, got format {quantization.get('format')!r}")
    quantization.update(quant_method="awq", modules_to_not_convert=FULL_PRECISION_MODULES)
    path.write_text(json.dumps(config, indent=2))


def quantize_awq(source: str, target: Path, conversations, group_size: int = 64, bits: int = 4, device: str = "cpu") -> float:
    """AWQ (GPTQModel), asymmetric, GEMM format; returns the quantization wall time in seconds."""
    from gptqmodel import AWQConfig
    from gptqmodel.quantization import FORMAT

    config = AWQConfig(bits=bits, group_size=group_size, sym=False, format=FORMAT.GEMM, offload_to_disk=False, device=device)
    return _gptqmodel_quantize(source, target, config, conversations)


def quantize_rtn(source: str, target: Path, conversations, group_size: int = 64, bits: int = 4, device: str = "cpu") -> float:
    """Round-to-nearest (GPTQModel RTN): AWQ's storage and grid without the search."""
    from gptqmodel import RTNConfig
    from gptqmodel.quantization import FORMAT

    config = RTNConfig(bits=bits, group_size=group_size, sym=False, format=FORMAT.GEMM, offload_to_disk=False, device=device)
    return _gptqmodel_quantize(source, target, config, conversations[:1])


def quantize_gptq(source: str, target: Path, conversations, group_size: int = 64, bits: int = 4, device: str = "cpu") -> float:
    """GPTQ (GPTQModel): error-compensating rounding, column by column, asymmetric, groups in natural order
    (``desc_act=False``, so each group has one scale and zero, as AWQ's); stored as ``medcomp.int4``."""
    from gptqmodel import GPTQConfig
    from gptqmodel.quantization import FORMAT

    config = GPTQConfig(bits=bits, group_size=group_size, sym=False, desc_act=False, format=FORMAT.GPTQ, offload_to_disk=False, device=device)
    return _gptqmodel_quantize(source, target, config, conversations, as_int4=True)


def quantize_bnb(source: str, target: Path, compute_dtype: str = "float32") -> float:
    """bitsandbytes nf4 (blocks of 64, as QLoRA's), quantized at load and saved 4-bit."""
    started = time.perf_counter()
    model = load_llava(source, dtype=compute_dtype, quantization_config=bnb_4bit_config(compute_dtype, FULL_PRECISION_MODULES))
    seconds = time.perf_counter() - started
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        load_processor(source).save_pretrained(staging)
    return seconds


QUANTIZERS = {"awq": quantize_awq, "rtn": quantize_rtn, "gptq": quantize_gptq}


@dataclass(frozen=True)
class QuantizedCheckpoint:
    path: Path
    method: str
    seconds: float
    reused: bool


def quantize(method: str, source: str, target: Path, conversations, group_size: int = 64, compute_dtype: str = "float32",
             device: str = "cpu") -> QuantizedCheckpoint:
    """Quantize ``source`` into ``target`` by ``method`` unless ``target`` already holds exactly that
    (same method, group size, calibration and source checkpoint): an interrupted stage resumes."""
    record = {"method": method, "group_size": group_size, "source_identity": [list(i) for i in checkpoint_identity(source)],
              "calibration": [describe_conversation(c) for c in conversations] if method in ("awq", "gptq") else []}
    saved = Path(target) / RECORD  # the source by identity, not path: a moved run folder still matches
    if saved.exists():
        previous = json.loads(saved.read_text())
        if {k: previous.get(k) for k in record} == record:
            return QuantizedCheckpoint(Path(target), method, previous["seconds"], True)
    if method == "bnb":
        seconds = quantize_bnb(source, Path(target), compute_dtype)
    elif method in QUANTIZERS:
        if method in ("awq", "gptq"):
            check_finite_activations(source, conversations, compute_dtype, device)
        release_accelerator_memory()  # the child needs the GPU this process may still hold
        seconds = _quantize_in_child(method, source, Path(target), conversations, group_size, device)
    else:
        raise ValueError(f"unknown quantization method {method!r}; known: awq, rtn, gptq, bnb")
    atomic_write_json(saved, {**record, "seconds": seconds})
    return QuantizedCheckpoint(Path(target), method, seconds, False)


if __name__ == "__main__":  # the child process of ``_quantize_in_child``
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    seconds = QUANTIZERS[spec["method"]](spec["source"], Path(spec["target"]), spec["conversations"], spec["group_size"], device=spec["device"])
    Path(spec["result"]).write_text(json.dumps(seconds))
