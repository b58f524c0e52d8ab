"""4-bit weight-only post-training quantization of a LLaVA's decoder layers (paper section 3.4).

Three methods, group size 64 as in the paper; the vision tower, projector, embeddings and lm_head
stay in full precision:

- **AWQ** (``quantize_awq``): GPTQModel's activation-aware scale search (Eq. 6-8) with calibration
  conversations from the training set, images included, so the activations are the multimodal ones.
  Saved in AWQ's GEMM format; transformers reloads it through GPTQModel.
- **Round-to-nearest** (``quantize_rtn``): GPTQModel's RTN, asymmetric min-max per group of 64, in the
  same GEMM storage as AWQ, minus the search.
- **bitsandbytes** nf4 (``quantize_bnb``): quantized at load, blocks of 64, and saved 4-bit.

Every quantized checkpoint is reloaded with ``from_pretrained`` and checked (``assert_decoder_quantized``)
before anything is measured: a quantizer that silently quantizes nothing is the classic failure.
Calibration activations are checked for NaN/inf first (``check_finite_activations``), since a known
AWQ failure on LLaVA is a silently broken model from non-finite scales.

The QLoRA deployment (``load_qlora_deployment``) keeps the finetune out of the rounding: the nf4 base
exactly as trained on, plus the unmerged adapter in full precision.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from medcomp.data import VQAExample, load_rgb
from medcomp.files import atomic_directory, atomic_write_json
from medcomp.models import LM_HEAD, PROJECTOR, VISION_TOWER, bnb_4bit_config, checkpoint_identity, decoder_layers, load_llava, load_processor

if TYPE_CHECKING:
    import pandas as pd

# Modules transformers must leave alone when it rebuilds a quantized LLaVA: without them it converts
# the CLIP tower's linears too and loading fails (``expect K to be divisible by qGroupSize``).
FULL_PRECISION_MODULES = [VISION_TOWER, PROJECTOR, LM_HEAD]
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECORD = "quantization.json"


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


def calibration_conversations(examples: Sequence[VQAExample], size: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``size`` training conversations (seeded sample), each image + question + reference answer in
    chat format, the image given by its path (``with_images_loaded`` puts the picture inline, as
    GPTQModel's LLaVA definition expects)."""
    import random

    if size > len(examples):
        raise ValueError(f"calibration_size {size} is larger than the {len(examples)} training conversations")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    conversations = []
    for index in chosen:
        messages = examples[index].messages()
        messages[0]["content"] = [{"type": "image", "image": examples[index].image} if item["type"] == "image" else item
                                  for item in messages[0]["content"]]
        conversations.append(messages)
    return conversations


@torch.inference_mode()
def calibration_activations(model, processor, conversations: Sequence[list[dict[str, Any]]], layer: int) -> dict[str, Any]:
    """Run the calibration conversations through ``model`` and return, for decoder layer ``layer``,
    ``q_proj``'s outputs and the per-channel mean magnitude of its inputs (what AWQ scales by: Figure 4).

    Raises ``QuantizationError`` naming the first decoder layer whose output holds NaN or inf.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range for {len(layers)} decoder layers")
    non_finite: list[int] = []
    captured: dict[str, list[torch.Tensor]] = {"q_out": [], "q_in": []}

    def check(index):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not non_finite and not torch.isfinite(hidden).all():
                non_finite.append(index)
        return hook

    def capture(module, inputs, output):
        captured["q_in"].append(inputs[0].reshape(-1, inputs[0].shape[-1]).float())
        captured["q_out"].append(output.reshape(-1, output.shape[-1]).float())

    handles = [block.register_forward_hook(check(i)) for i, block in enumerate(layers)]
    handles.append(layers[layer].self_attn.q_proj.register_forward_hook(capture))
    try:
        for conversation in conversations:
            text = processor.apply_chat_template([_without_inline_image(m) for m in conversation])
            image = load_rgb(next(item["image"] for item in conversation[0]["content"] if item["type"] == "image"))
            inputs = processor(text=text, images=image, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            model(**inputs.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    if non_finite:
        raise QuantizationError(f"decoder layer {non_finite[0]} produces NaN/inf on the calibration data: "
                                "quantizing with these activations would give non-finite scales")
    q_in = torch.cat(captured["q_in"])
    return {"layer": layer, "q_proj_output": torch.cat(captured["q_out"]), "input_channel_magnitude": q_in.abs().mean(dim=0)}


def _without_inline_image(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        return message
    return {**message, "content": [{"type": "image"} if item["type"] == "image" else item for item in content]}


def check_finite_activations(source: str, conversations: Sequence[list[dict[str, Any]]], dtype: str = "float32") -> None:
    """Refuse to quantize ``source`` if any decoder layer's output on the calibration data is not finite."""
    model = load_llava(source, dtype=dtype)
    calibration_activations(model, load_processor(source), conversations, len(decoder_layers(model)) - 1)


def _quiet():
    """Transformers' loader notes go to stdout; reports carry this run's output only."""
    return contextlib.redirect_stdout(io.StringIO())


def with_images_loaded(conversations: Sequence[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The conversations with each image path replaced by the picture itself."""
    return [[{**m, "content": [{**item, "image": load_rgb(item["image"])} if isinstance(item, dict) and item.get("type") == "image" else item
                               for item in m["content"]]} if not isinstance(m["content"], str) else m for m in conversation]
            for conversation in conversations]


def _gptqmodel_quantize(source: str, target: Path, config, conversations) -> float:
    """Run GPTQModel in this process (``quantize`` runs it in a child process; see there)."""
    import_gptqmodel_quietly()
    from gptqmodel import GPTQModel

    started = time.perf_counter()
    # GPTQModel packs into float16/bfloat16 only; the search runs in that dtype too.
    model = GPTQModel.load(source, config, dtype=torch.float16)
    model.quantize(with_images_loaded(conversations), batch_size=1)
    seconds = time.perf_counter() - started
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
        child = subprocess.run([sys.executable, "-m", "medcomp.quantization", str(spec)], capture_output=True, text=True, cwd=scratch)
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


def quantize_bnb(source: str, target: Path, compute_dtype: str = "float32") -> float:
    """bitsandbytes nf4 (blocks of 64, as QLoRA's), quantized at load and saved 4-bit."""
    started = time.perf_counter()
    model = load_llava(source, dtype=compute_dtype, quantization_config=bnb_4bit_config(compute_dtype, FULL_PRECISION_MODULES))
    seconds = time.perf_counter() - started
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        load_processor(source).save_pretrained(staging)
    return seconds


QUANTIZERS = {"awq": quantize_awq, "rtn": quantize_rtn}


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
    record = {"method": method, "group_size": group_size, "source": str(source), "source_identity": [list(i) for i in checkpoint_identity(source)],
              "calibration": [_describe_conversation(c) for c in conversations] if method == "awq" else []}
    saved = Path(target) / RECORD
    if saved.exists():
        previous = json.loads(saved.read_text())
        if {k: previous.get(k) for k in record} == record:
            return QuantizedCheckpoint(Path(target), method, previous["seconds"], True)
    if method == "bnb":
        seconds = quantize_bnb(source, Path(target), compute_dtype)
    elif method in QUANTIZERS:
        if method == "awq":
            check_finite_activations(source, conversations, compute_dtype)
        seconds = _quantize_in_child(method, source, Path(target), conversations, group_size, device)
    else:
        raise ValueError(f"unknown quantization method {method!r}; known: awq, rtn, bnb")
    atomic_write_json(saved, {**record, "seconds": seconds})
    return QuantizedCheckpoint(Path(target), method, seconds, False)


def _describe_conversation(conversation) -> str:
    """Text and image content of a calibration conversation, for the reuse record."""
    import hashlib

    images = [hashlib.sha256(Path(item["image"]).read_bytes()).hexdigest()[:16] for item in conversation[0]["content"] if item["type"] == "image"]
    return json.dumps([_without_inline_image(m) for m in conversation] + images, sort_keys=True)


def load_quantized(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """``from_pretrained`` a quantized checkpoint and check its decoder really is 4-bit.

    On the CPU, AWQ checkpoints use GPTQModel's ``torch_fused_awq`` layer (int4 kernel): the default
    layer de-packs every weight on every forward (about 45x slower here).
    """
    from transformers import AwqConfig, LlavaForConditionalGeneration

    from medcomp.models import TORCH_DTYPES

    import_gptqmodel_quietly()

    config = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype], "device_map": {"": device}}
    if config.get("quant_method") == "awq" and device == "cpu":
        kwargs["quantization_config"] = AwqConfig(bits=config["bits"], group_size=config["group_size"], backend="torch_fused_awq",
                                                  modules_to_not_convert=FULL_PRECISION_MODULES)
    import warnings

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")  # "the quantization_config from the model will be used": expected
        model = LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
    assert_decoder_quantized(model)
    return model


def is_quantized_linear(module) -> bool:
    """A 4-bit linear of bitsandbytes or GPTQModel (not a plain ``nn.Linear``)."""
    kind = type(module)
    return hasattr(getattr(module, "weight", None), "quant_state") or "Awq" in kind.__name__ or "QuantLinear" in kind.__name__


def assert_decoder_quantized(model) -> None:
    """Every linear of every decoder layer is 4-bit with finite scales, and nothing outside the decoder
    is; else ``QuantizationError`` naming the module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for index, layer in enumerate(decoder_layers(base)):
        for name in DECODER_LINEARS:
            module = _find_linear(layer, name)
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


def _find_linear(layer, name: str, unwrap: bool = True):
    """A decoder layer's linear by name; ``unwrap``: the quantized layer under a LoRA wrapper rather
    than the wrapper (whose forward adds the adapter)."""
    for parent in ("self_attn", "mlp"):
        owner = getattr(layer, parent, None)
        if owner is not None and hasattr(owner, name):
            module = getattr(owner, name)
            return getattr(module, "base_layer", module) if unwrap else module
    return None


@torch.no_grad()
def effective_weight(linear) -> torch.Tensor:
    """The weight a (quantized) linear applies, as a float32 ``[out, in]`` matrix: its output on the
    identity minus its bias. The same probe serves bitsandbytes, GPTQModel, LoRA-wrapped and plain layers."""
    out = linear(torch.eye(linear.in_features)).float()
    bias = getattr(linear, "bias", None)
    if bias is not None:
        out = out - bias.float()
    return out.T.contiguous()


def _input_scale(quantized_layer, reference_layer, name: str) -> torch.Tensor | None:
    """AWQ's per-input-channel scale s for ``name``, recovered from the RMSNorm it was folded into
    (``norm_new = norm_old / s``), or None where no norm feeds the linear (``o_proj``, ``down_proj``)."""
    norm = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
            "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}.get(name)
    if norm is None:
        return None
    old, new = getattr(reference_layer, norm).weight.detach().float(), getattr(quantized_layer, norm).weight.detach().float()
    scale = old / new
    return None if torch.allclose(scale, torch.ones_like(scale)) else scale


@torch.no_grad()
def _scaled_away(layer, reference_layer) -> set[str]:
    """Linears whose output rows AWQ rescaled to absorb the next linear's scale (``up_proj`` for
    ``down_proj``, ``v_proj`` for ``o_proj``): their weights cannot be compared one to one."""
    skipped = set()
    for producer, consumer, norm_fed in (("up_proj", "down_proj", "post_attention_layernorm"), ("v_proj", "o_proj", "input_layernorm")):
        weight = effective_weight(_find_linear(layer, consumer))
        reference = _find_linear(reference_layer, consumer).weight.detach().float()
        # a consumer whose columns were scaled differs from its reference by far more than rounding
        if float((weight - reference).norm() / reference.norm()) > 0.5:
            skipped |= {producer, consumer}
    return skipped


@torch.no_grad()
def weight_comparisons(model, reference, layers: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """For each decoder linear: its effective weight mapped back to ``reference``'s input space (AWQ's
    folded scales undone), and ``reference``'s weight. Linears AWQ rescaled on the output side are
    left out (see ``_scaled_away``)."""
    rows = []
    for index, (layer, ref_layer) in enumerate(zip(decoder_layers(model), decoder_layers(reference))):
        if layers is not None and index not in layers:
            continue
        skipped = _scaled_away(layer, ref_layer)
        for name in DECODER_LINEARS:
            if name in skipped:
                continue
            weight = effective_weight(_find_linear(layer, name, unwrap=False))
            scale = _input_scale(layer, ref_layer, name)
            if scale is not None:
                weight = weight / scale
            rows.append({"layer": index, "linear": name, "weight": weight, "reference": _find_linear(ref_layer, name).weight.detach().float()})
    return rows


def quantization_error(model, reference) -> dict[str, float]:
    """Relative Frobenius error of each decoder linear against ``reference`` (same architecture,
    unquantized). An error of zero means that linear was not really quantized."""
    return {f"{row['layer']}.{row['linear']}": float((row["weight"] - row["reference"]).norm() / row["reference"].norm())
            for row in weight_comparisons(model, reference)}


def adapter_deltas(adapter_dir: str | Path) -> dict[tuple[int, str], torch.Tensor]:
    """The weight change a saved LoRA adapter makes to each decoder linear: ``alpha / r * B @ A``,
    keyed by (decoder layer, linear name)."""
    import re

    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pattern = re.compile(r"language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A\.weight$")
    deltas = {}
    for key, lora_a in tensors.items():
        match = pattern.search(key)
        if match:
            lora_b = tensors[key.replace("lora_A", "lora_B")]
            deltas[(int(match[1]), match[2])] = scaling * lora_b.float() @ lora_a.float()
    if not deltas:
        raise ValueError(f"no decoder LoRA weights found in {adapter_dir}")
    return deltas


def finetune_survival(model, merged, adapter_dir: str | Path, group_size: int = 64) -> "pd.DataFrame":
    """What of an SFT's weight change is still in a quantized model, per decoder linear.

    With Δ the adapter's change and ``base = merged - Δ`` the weights it was trained on, the
    quantized model's change is ``W_q - base``. ``kept`` is its projection on Δ (1: all of Δ is there,
    0: rounded away), ``cosine`` its direction's agreement with Δ. ``delta / step`` is Δ's median size
    in units of a 4-bit step of its group (``(max - min) / 15`` over ``group_size`` inputs), and
    ``below half a step`` the share of Δ's entries that rounding to that grid can erase outright.
    """
    import pandas as pd

    deltas = adapter_deltas(adapter_dir)
    rows = []
    for row in weight_comparisons(model, merged):
        delta = deltas.get((row["layer"], row["linear"]))
        if delta is None:
            continue
        change = row["weight"] - (row["reference"] - delta)
        flat_delta, flat_change = delta.flatten(), change.flatten()
        groups = row["reference"].reshape(row["reference"].shape[0], -1, group_size)
        step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group_size, dim=1)
        ratio = delta.abs() / step.clamp(min=1e-12)
        rows.append({
            "layer": row["layer"], "linear": row["linear"],
            "kept": float(flat_change @ flat_delta / (flat_delta @ flat_delta)),
            "cosine": float(torch.nn.functional.cosine_similarity(flat_change, flat_delta, dim=0)),
            "delta / step": float(ratio.median()),
            "below half a step": float((ratio < 0.5).float().mean()),
        })
    return pd.DataFrame(rows)


def load_qlora_deployment(base_source: str, adapter_dir: str | Path, compute_dtype: str = "float32"):
    """QLoRA as deployed: the base in nf4 exactly as it was trained on, plus the adapter, unmerged and
    in full precision. The finetune never passes through a rounding (see ``finetune_survival``)."""
    from peft import PeftModel

    base = load_llava(base_source, dtype=compute_dtype, quantization_config=bnb_4bit_config(compute_dtype, FULL_PRECISION_MODULES))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    assert_decoder_quantized(model)
    return model


def decoder_bytes(model) -> int:
    """Bytes of the decoder layers' tensors as stored (4-bit packed weights counted packed)."""
    from medcomp.models import tensor_bytes

    return tensor_bytes(decoder_layers(model))


@dataclass(frozen=True)
class QuantizationStep:
    source: str  # the variant quantized
    method: str  # awq, rtn, bnb, or qlora (nf4 base as trained on + unmerged adapter)
    role: str  # finetuned, pruned, recovered, recovered_magnitude

    @property
    def name(self) -> str:
        return f"{self.source}-{self.method}"


def quantization_plan(settings, variants: dict[str, Any], recovered: Sequence[str]) -> list[QuantizationStep]:
    """Every (model, method) cell asked for: ``settings`` lists methods per role (see
    ``params.QuantizationParams``); ``recovered`` are 04's variants, the first one the pipeline's model."""
    if "finetuned" not in variants:
        raise ValueError("no 'finetuned' variant registered: run 01_finetune first")
    magnitude = [name for name in recovered if name.endswith("-magnitude")]
    by_depth = [name for name in recovered if name not in magnitude]
    roles: list[tuple[str, str, Sequence[str]]] = [("finetuned", "finetuned", settings.finetuned)]
    if by_depth:
        # quantize-then-recover starts from the pruned model quantized by its method: those cells too
        pruned_methods = tuple(dict.fromkeys([*settings.pruned, *settings.quantize_then_recover]))
        roles.append((variants[by_depth[0]].parent, "pruned", pruned_methods))
    roles += [(name, "recovered", tuple(dict.fromkeys([*settings.recovered, *(settings.pipeline_ablations if index == 0 else ())])))
              for index, name in enumerate(by_depth)]
    roles += [(name, "recovered_magnitude", settings.recovered_magnitude) for name in magnitude]
    steps = [QuantizationStep(source, method, role) for source, role, methods in roles for method in methods]
    if settings.qlora_deployment:
        steps += [QuantizationStep(source, "qlora", role) for source, role in [("finetuned", "finetuned"), *[(n, "recovered") for n in by_depth[:1]]]
                  if "adapter" in variants[source].extra]
    return steps


def load_variant(variant, dtype: str = "float32", device: str = "cpu"):
    """Load any registered variant the way it is served: full precision, AWQ/RTN GEMM, bnb nf4, or
    the QLoRA deployment (nf4 base + unmerged adapter)."""
    kind = variant.extra.get("format")
    if kind == "qlora":
        return load_qlora_deployment(variant.extra["sft_base"], variant.path, dtype)
    if kind == "adapter-on-quantized":
        from peft import PeftModel

        return PeftModel.from_pretrained(load_quantized(variant.extra["quantized_base"], device, dtype), variant.path).eval()
    if kind in ("awq", "rtn", "bnb"):
        return load_quantized(variant.path, device, dtype)
    return load_llava(variant.path, dtype=dtype, device=device)


def build_quantized(run, stage: str, step: QuantizationStep, conversations, test_examples, dtype: str, device: str,
                    group_size: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Quantize (or reuse), reload and check, measure, answer the test set (or reuse), register; and,
    where the source came from an SFT, measure how much of that SFT's weight change survived."""
    from medcomp.evaluation import answer_stats, generate_answers
    from medcomp.models import tensor_bytes
    from medcomp.runs import Variant

    source = run.variant(step.source)
    started = time.perf_counter()
    if step.method == "qlora":
        path, seconds = Path(source.extra["adapter"]), 0.0
        extra = {"format": "qlora", "sft_base": source.extra["sft_base"],
                 "identity": [list(i) for i in checkpoint_identity(path) + checkpoint_identity(source.extra["sft_base"])]}
        previous = run.variants().get(step.name)
        reused = previous is not None and previous.extra.get("identity") == extra["identity"] and run.has_answers(step.name)
    else:
        checkpoint = quantize(step.method, source.path, run.stage_dir(stage) / step.name, conversations, group_size, dtype, device)
        path, seconds, reused = checkpoint.path, checkpoint.seconds, checkpoint.reused and run.has_answers(step.name)
        extra = {"format": step.method}
    variant = Variant(name=step.name, stage=stage, path=str(path), parent=source.name, layers_removed=source.layers_removed, bits=4,
                      parameters=source.parameters, notes=f"{step.method} 4-bit of {source.name}",
                      extra={**extra, "group_size": group_size, "quantize seconds": round(seconds, 1), "role": step.role,
                             **({"adapter": source.extra["adapter"]} if "adapter" in source.extra else {})})
    model = load_variant(variant, dtype, device)
    run.register_variant(variant)
    if reused:
        answers = run.answers(step.name)
    else:
        answers = generate_answers(model, load_processor(source.path), test_examples, max_new_tokens, batch_size,
                                   description=f"answering ({step.name})")
        run.save_answers(step.name, answers)
    survival = None
    if "adapter" in source.extra:
        merged = load_llava(source.path, dtype="float32")
        survival = finetune_survival(model, merged, source.extra["adapter"], group_size)
        del merged
    result = {"variant": step.name, "source": source.name, "method": step.method, "role": step.role, "fraction": source.extra.get("fraction"),
              "quantize seconds": seconds, "decoder bytes": decoder_bytes(model), "model bytes": tensor_bytes(model),
              **answer_stats(answers), "survival": survival, "seconds": time.perf_counter() - started}
    del model
    return result


def _paper_model_row(result: dict[str, Any]) -> str | None:
    """Table 3's row for one of our models: the unpruned one, or a recovered level by its fraction of depth."""
    from medcomp.recovery import paper_layers_of_32

    if result["source"] == "finetuned":
        return "Base LLaVA (7B)"
    return {7: "Pruned LLaVA (5.6B)", 9: "Pruned LLaVA (5.2B)"}.get(paper_layers_of_32(result.get("fraction")))


def table_3(results: Sequence[dict[str, Any]], paper_table: "pd.DataFrame", reference_bytes: dict[str, int]) -> "pd.DataFrame":
    """Each model × method: held-out naming, decoder and whole-model memory (and their ratio to the
    unquantized finetuned model), quantization wall time; the paper's scores and VRAM beside."""
    import pandas as pd

    cells = [r for r in results if r["role"] in ("finetuned", "recovered") and r["method"] in ("awq", "bnb", "rtn")]
    methods = [m for m in ("awq", "bnb", "rtn") if any(r["method"] == m for r in cells)]
    measures = {
        "naming": lambda r: f"{r['naming accuracy']:.1%}",
        "decoder MB": lambda r: f"{r['decoder bytes'] / 1e6:.1f} ({r['decoder bytes'] / reference_bytes['decoder']:.2f}×)",
        "model MB": lambda r: f"{r['model bytes'] / 1e6:.1f} ({r['model bytes'] / reference_bytes['model']:.2f}×)",
        "quantize (s)": lambda r: round(r["quantize seconds"], 1),
    }
    rows = []
    for source in dict.fromkeys(r["source"] for r in cells):
        by_method = {r["method"]: r for r in cells if r["source"] == source}
        row: dict[str, Any] = {"model": source}
        for measure, show in measures.items():
            row |= {f"{measure} {m}": show(by_method[m]) if m in by_method else "—" for m in methods}
        paper_name = _paper_model_row(next(iter(by_method.values())))
        row["paper row"] = paper_name or "—"
        if paper_name in paper_table.index:
            row |= {f"paper: {k}": v for k, v in paper_table.loc[paper_name].items()}
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def variant_measurements(run, name: str, results_by_name: dict[str, dict[str, Any]], dtype: str = "float32") -> dict[str, Any]:
    """What Table 4 shows of a variant: this stage's measurements if it made the variant, else the
    full-precision model loaded and measured, with naming from its saved answers."""
    from medcomp.evaluation import answer_stats
    from medcomp.models import tensor_bytes

    variant = run.variant(name)
    if name in results_by_name:
        return {**results_by_name[name], "parameters": variant.parameters, "bits": variant.bits}
    model = load_llava(variant.path, dtype=dtype)
    row = {"variant": name, "parameters": variant.parameters, "bits": variant.bits, "decoder bytes": decoder_bytes(model),
           "model bytes": tensor_bytes(model), **answer_stats(run.answers(name))}
    del model
    return row


def table_4(rows: Sequence[tuple[str, dict[str, Any]]], paper_table: "pd.DataFrame", reference_bytes: dict[str, int]) -> "pd.DataFrame":
    """The paper's overall comparison: ``rows`` are (paper method, this run's measurements) pairs;
    methods the paper does not have (this project's orders that keep the finetune) get no paper columns."""
    import pandas as pd

    table = []
    for method, r in rows:
        row = {"method": method, "variant": r["variant"], "parameters (M)": round(r["parameters"] / 1e6, 1), "bit width": r["bits"],
               "naming accuracy": f"{r['naming accuracy']:.1%}", "answers never stopping": f"{r['never stopped']:.0%}",
               "decoder MB": f"{r['decoder bytes'] / 1e6:.1f} ({r['decoder bytes'] / reference_bytes['decoder']:.2f}×)",
               "model MB": f"{r['model bytes'] / 1e6:.1f} ({r['model bytes'] / reference_bytes['model']:.2f}×)",
               "score, latency, peak memory": "see 06 and 07"}
        if method in paper_table.index:
            row |= {f"paper: {k}": v for k, v in paper_table.loc[method].items()}
        table.append(row)
    return pd.DataFrame(table).set_index("method")


def survival_summary(results: Sequence[dict[str, Any]]) -> "pd.DataFrame":
    """Per quantized variant of an SFT'd model: what of the SFT's weight change survived (medians over
    the decoder linears compared), and held-out naming."""
    import pandas as pd

    rows = []
    for r in results:
        frame = r.get("survival")
        if frame is None or frame.empty:
            continue
        rows.append({"variant": r["variant"], "method": r["method"], "linears compared": len(frame),
                     "kept (median)": round(float(frame["kept"].median()), 3), "cosine (median)": round(float(frame["cosine"].median()), 3),
                     "delta / 4-bit step (median)": round(float(frame["delta / step"].median()), 3),
                     "entries below half a step": f"{frame['below half a step'].mean():.1%}",
                     "naming accuracy": f"{r['naming accuracy']:.1%}"})
    return pd.DataFrame(rows).set_index("variant")


def recover_on_quantized(run, stage: str, quantized: str, train_examples, test_examples, params, device: str,
                         max_new_tokens: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Quantize first, then recover: 04's recovery SFT trained against the 4-bit variant ``quantized``
    (AWQ or RTN of a pruned model), the adapter kept unmerged. Registered as ``<quantized>-sft``."""
    from medcomp.evaluation import PeakMemory, answer_stats, generate_answers
    from medcomp.files import content_hash
    from medcomp.models import tensor_bytes
    from medcomp.runs import Variant
    from medcomp.training import finetune_on_quantized

    base = run.variant(quantized)
    pruned = run.variant(base.parent)
    name = f"{quantized}-sft"
    identity = [list(i) for i in checkpoint_identity(base.path)]
    setup = content_hash([identity, params.model_dump(mode="json"), [(e.image, e.question) for e in train_examples], seed], 16)
    previous = run.variants().get(name)
    started = time.perf_counter()
    if previous is not None and previous.extra.get("setup") == setup and run.has_answers(name):
        model, answers, seconds, peak = load_variant(previous, params.compute_dtype, device), run.answers(name), previous.extra["SFT seconds"], previous.extra.get("SFT peak", {})
    else:
        with PeakMemory() as memory:
            result = finetune_on_quantized(base.path, pruned.path, device, train_examples, params, run.stage_dir(stage) / name, seed)
        seconds, peak = result.train_seconds, memory.gib
        variant = Variant(name=name, stage=stage, path=str(result.adapter_dir), parent=quantized, layers_removed=base.layers_removed, bits=4,
                          parameters=base.parameters, notes=f"recovery SFT against {quantized}, adapter unmerged",
                          extra={"format": "adapter-on-quantized", "quantized_base": base.path, "setup": setup, "role": "quantize_then_recover",
                                 "SFT seconds": round(seconds, 1), "SFT peak": peak, "log_history": result.log_history})
        run.register_variant(variant)
        model = load_variant(variant, params.compute_dtype, device)
        answers = generate_answers(model, load_processor(pruned.path), test_examples, max_new_tokens, batch_size, description=f"answering ({name})")
        run.save_answers(name, answers)
    result = {"variant": name, "source": quantized, "method": f"{base.extra['format']} then SFT", "role": "quantize_then_recover",
              "quantize seconds": base.extra.get("quantize seconds", 0.0), "SFT seconds": seconds, **{f"SFT {k}": v for k, v in peak.items()},
              "decoder bytes": decoder_bytes(model), "model bytes": tensor_bytes(model), **answer_stats(answers), "survival": None,
              "seconds": time.perf_counter() - started, "log_history": run.variant(name).extra.get("log_history", [])}
    del model
    return result


if __name__ == "__main__":  # the child process of ``_quantize_in_child``
    import sys

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    seconds = QUANTIZERS[spec["method"]](spec["source"], Path(spec["target"]), spec["conversations"], spec["group_size"], device=spec["device"])
    Path(spec["result"]).write_text(json.dumps(seconds))
