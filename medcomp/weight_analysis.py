"""What of an SFT's weight change survives 4-bit rounding, read from the weights themselves.

A quantized linear's effective weight is probed as its output on the identity; AWQ's scales folded
into the RMSNorms are undone before comparing with the unquantized reference. ``finetune_survival``
projects the quantized model's change onto the adapter's change: why merging then quantizing can
lose a small finetune, and keeping the adapter unmerged does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

import torch

from medcomp.loading import DECODER_LINEARS, decoder_layers, find_linear

if TYPE_CHECKING:
    import pandas as pd


def _device_of(linear) -> torch.device:
    base = getattr(linear, "base_layer", linear)
    return next(iter([*base.parameters(), *base.buffers()])).device


@torch.no_grad()
def effective_weight(linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a (quantized) linear applies, as a float32 ``[out, in]`` matrix: its output on the
    identity minus its bias. The same probe serves bitsandbytes, GPTQModel, LoRA-wrapped and plain layers.
    The identity is built on the layer's device in ``dtype``, the dtype the model computes in."""
    device = _device_of(linear)
    out = linear(torch.eye(linear.in_features, device=device, dtype=dtype)).float().cpu()
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
    old, new = getattr(reference_layer, norm).weight.detach().float().cpu(), getattr(quantized_layer, norm).weight.detach().float().cpu()
    scale = old / new
    return None if torch.allclose(scale, torch.ones_like(scale)) else scale


@torch.no_grad()
def _scaled_away(layer, reference_layer, dtype: torch.dtype) -> set[str]:
    """Linears whose output rows AWQ rescaled to absorb the next linear's scale (``up_proj`` for
    ``down_proj``, ``v_proj`` for ``o_proj``): their weights cannot be compared one to one."""
    skipped = set()
    for producer, consumer, norm_fed in (("up_proj", "down_proj", "post_attention_layernorm"), ("v_proj", "o_proj", "input_layernorm")):
        weight = effective_weight(find_linear(layer, consumer), dtype)
        reference = find_linear(reference_layer, consumer).weight.detach().float().cpu()
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
        skipped = _scaled_away(layer, ref_layer, model.dtype)
        for name in DECODER_LINEARS:
            if name in skipped:
                continue
            weight = effective_weight(find_linear(layer, name, unwrap=False), model.dtype)
            scale = _input_scale(layer, ref_layer, name)
            if scale is not None:
                weight = weight / scale
            rows.append({"layer": index, "linear": name, "weight": weight, "reference": find_linear(ref_layer, name).weight.detach().float().cpu()})
    return rows


class _LazyDeltas(Mapping):
    """(layer, linear) -> ``alpha / r * B @ A``, computed when read and not kept: a 7B model's changes in fp32 all at
    once would take 26 GB, more than a Kaggle notebook's RAM; one linear's is at most 180 MB."""

    def __init__(self, factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], scaling: float):
        self._factors, self._scaling = factors, scaling

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        lora_b, lora_a = self._factors[key]
        return self._scaling * lora_b.float() @ lora_a.float()

    def __iter__(self):
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)


def adapter_deltas(adapter_dir: str | Path) -> Mapping[tuple[int, str], torch.Tensor]:
    """The weight change a saved LoRA adapter makes to each decoder linear: ``alpha / r * B @ A``,
    keyed by (decoder layer, linear name); each is computed when it is read (``_LazyDeltas``)."""
    import re

    from safetensors.torch import load_file

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pattern = re.compile(r"language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A\.weight$")
    factors = {(int(match[1]), match[2]): (tensors[key.replace("lora_A", "lora_B")], lora_a)
               for key, lora_a in tensors.items() if (match := pattern.search(key))}
    if not factors:
        raise ValueError(f"no decoder LoRA weights found in {adapter_dir}")
    return _LazyDeltas(factors, config["lora_alpha"] / config["r"])


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
    # a layer at a time: a 7B model's linears, their references and changes in fp32 would not fit a Kaggle notebook's RAM
    compared = (row for index in range(len(decoder_layers(model))) for row in weight_comparisons(model, merged, layers=[index]))
    for row in compared:
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


@torch.no_grad()
def finetune_concentration(merged, adapter_dir: str | Path, group_size: int = 64, spare_bytes: int = 0) -> dict[str, Any]:
    """Whether keeping some groups at 8 bits could hold the finetune (issue 31, mixed precision), read from the weights.

    Rounding to a 4-bit grid adds noise of about ``step / sqrt(12)`` to every weight, independent of the finetune's
    change Δ, so what a group loses of Δ grows with ``sum((Δ / step)^2)`` over it: its share of the finetune in units
    of its own rounding noise. Mixed precision pays only if a few groups hold most of that. ``spare_bytes`` buys
    ``group_size / 2`` bytes of 4 more bits per group: ``top share`` is the part held by as many groups as it buys, those
    that hold the most, against their ``share at 8 bits`` of the groups (what a uniform spread would give). The grid is
    round-to-nearest of ``merged`` (the weights a quantizer sees), per ``group_size`` inputs. Also per decoder layer,
    the median over its linears of each one's median ``|Δ| / step``; one linear's change is held at a time."""
    deltas = adapter_deltas(adapter_dir)
    energies, per_layer = [], {}
    for index, layer in enumerate(decoder_layers(merged)):
        for name in DECODER_LINEARS:
            delta = deltas.get((index, name))
            if delta is None:
                continue
            weight = find_linear(layer, name).weight.detach().float().cpu()
            groups = weight.reshape(weight.shape[0], -1, group_size)
            step = ((groups.amax(-1) - groups.amin(-1)) / 15).clamp(min=1e-12)
            ratio = delta.reshape(groups.shape).abs() / step.unsqueeze(-1)
            energies.append(ratio.pow(2).sum(-1).flatten())
            per_layer.setdefault(index, []).append(ratio.flatten().median())
    energy = torch.cat(energies).double().sort(descending=True).values
    kept = min(energy.numel(), max(0, int(spare_bytes)) // (group_size // 2))
    return {"groups": energy.numel(), "groups at 8 bits": kept, "share at 8 bits": kept / energy.numel(),
            "top share": float(energy[:kept].sum() / energy.sum()) if kept and energy.sum() > 0 else 0.0,
            "median |delta| / step by layer": {layer: float(torch.stack(r).median()) for layer, r in per_layer.items()}}


@torch.no_grad()
def dequantized_model(checkpoint: str | Path, source: str | Path, dtype: str = "float32"):
    """An AWQ/RTN (GEMM-format) checkpoint's model with its 4-bit weights dequantized once into plain
    ``nn.Linear`` layers of ``dtype``: the same weights as the int4 kernel serves, without the kernel.

    On the CPU GPTQModel's ``torch_fused_awq`` casts activations and scales to bf16; serving the weights
    this way says what that cast costs (``05``'s answers stay on the kernel: it is what deploys).
    ``source`` is the unquantized model the checkpoint came from, for the architecture; every tensor the
    checkpoint holds replaces its own (AWQ folds its scales into the norms: those come from the
    checkpoint too). The unpacking is GPTQModel's ``dequantize_gemm``, not ours.
    """
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import load_file

    from medcomp.loading import QuantizationError, load_llava, quantization_config

    config = quantization_config(checkpoint)
    if config.get("quant_method") != "awq" or config.get("format", "gemm") != "gemm":
        raise QuantizationError(f"{checkpoint} is not an AWQ GEMM-format checkpoint (quantization_config {config.get('quant_method')!r})")
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        tensors |= load_file(str(path))
    model = load_llava(str(source), dtype=dtype)
    parameters = dict(model.named_parameters())
    dequantized = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.qweight" in tensors:
            weight = dequantize_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                                     config["bits"], config["group_size"])
            module.weight.copy_(weight.T.to(module.weight.dtype))
            dequantized += 1
    for name, tensor in tensors.items():
        if name in parameters and parameters[name].shape == tensor.shape:
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    expected = len(decoder_layers(model)) * len(DECODER_LINEARS)
    if dequantized != expected:
        raise QuantizationError(f"{checkpoint}: {dequantized} decoder linears dequantized, expected {expected}")
    return model.eval()
