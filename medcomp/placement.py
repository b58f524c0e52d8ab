"""Which GPU holds which part of LLaVA when one model spans several (Kaggle's two T4s): the device map.

The decoder is cut into contiguous runs of blocks, one run per GPU, chosen so that the fullest GPU holds
as little as possible. The vision tower, the projector and the token embeddings go on the first GPU, where
generation's inputs start (``loading.to_model_inputs`` sends a batch to the model's first parameter); the
final norm, the rotary embedding and the lm_head go on the last, where the logits come out. Blocks are
never split (transformers' ``_no_split_modules``), so accelerate's hooks move one hidden state per
boundary and nothing else.

Why not ``device_map="auto"``: accelerate fills GPU 0 first, leaving the KV cache and the activations of
one GPU no room, and its choice cannot be checked before the model is downloaded. This split is computed
from the config's parameter counts (on the meta device), so ``medcomp.plan`` can test it against the real
config, per GPU, on a CPU, and the run loads exactly the map the plan checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

LAYERS = "model.language_model.layers"
FIRST_GPU_MODULES = ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens")
LAST_GPU_MODULES = ("model.language_model.norm", "model.language_model.rotary_emb", "lm_head")

_GPUS = 1  # set per process by ``use_gpus`` (the notebook kernel's params); one GPU unless asked


def use_gpus(count: int) -> None:
    """How many GPUs this process's CUDA loads spread a model over (``model.gpus``)."""
    global _GPUS
    _GPUS = max(1, int(count))


def gpus_in_use() -> int:
    return _GPUS


@dataclass(frozen=True)
class Parts:
    """Parameter counts of the three parts a split moves: what must sit on the first GPU, one decoder block,
    what must sit on the last; and how many of a block's parameters are its linears (4-bit when quantized)."""

    first: int
    layer: int
    layer_linear: int
    last: int
    layers: int

    def part_bytes(self, bits: int = 16, group_size: int = 64) -> tuple[float, float, float]:
        """Bytes of (first, one block, last): fp16, or the block's linears in ``bits`` with a scale and zero a group."""
        linear = self.layer_linear * (2 if bits == 16 else bits / 8 + 2.5 / group_size)
        return 2.0 * self.first, linear + 2.0 * (self.layer - self.layer_linear), 2.0 * self.last


def parts_of(config: dict[str, Any]) -> Parts:
    """``Parts`` of a LLaVA config, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(**config))
    counts = {name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in FIRST_GPU_MODULES + LAST_GPU_MODULES}
    block = model.get_submodule(LAYERS)[0]
    linear = sum(p.numel() for name, p in block.named_parameters() if name.endswith("proj.weight"))
    return Parts(sum(counts[n] for n in FIRST_GPU_MODULES), sum(p.numel() for p in block.parameters()), linear,
                 sum(counts[n] for n in LAST_GPU_MODULES), len(model.get_submodule(LAYERS)))


def balanced_layers(first: float, layer: float, last: float, layers: int, gpus: int) -> tuple[int, ...]:
    """Blocks per GPU, contiguous, in order, minimising the fullest GPU's bytes (first on GPU 0, last on the
    last GPU). Exhaustive over the cut points for two GPUs; for more, the smallest capacity whose greedy
    fill places every block."""
    if gpus <= 1 or layers == 0:
        return (layers,)
    gpus = min(gpus, layers)
    if gpus == 2:
        best = min(range(layers + 1), key=lambda k: (max(first + k * layer, (layers - k) * layer + last), abs(2 * k - layers)))
        return (best, layers - best)

    def fill(capacity: float) -> tuple[int, ...] | None:
        counts, load, gpu = [0] * gpus, first, 0
        for _ in range(layers):
            if load + layer > capacity and counts[gpu] > 0 and gpu < gpus - 1:
                gpu, load = gpu + 1, 0.0
            counts[gpu] += 1
            load += layer
        return tuple(counts) if load + last <= capacity else None

    low, high = max(first, last, layer), first + layers * layer + last
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if fill(middle) is None else (low, middle)
    return fill(high) or (layers,)


def device_map(layers_per_gpu: Sequence[int], devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """Every module that holds weights, mapped to its device (GPU index, or ``devices[i]``)."""
    devices = list(devices) if devices is not None else list(range(len(layers_per_gpu)))
    mapping: dict[str, Any] = {name: devices[0] for name in FIRST_GPU_MODULES}
    index = 0
    for gpu, count in enumerate(layers_per_gpu):
        for _ in range(count):
            mapping[f"{LAYERS}.{index}"] = devices[gpu]
            index += 1
    mapping.update({name: devices[len(layers_per_gpu) - 1] for name in LAST_GPU_MODULES})
    return mapping


def cuda_device_map(source: str | Path, bits: int = 16, gpus: int | None = None, devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """The device map a CUDA load of ``source`` uses: everything on the one GPU, or the balanced split over
    ``gpus`` (default ``gpus_in_use()``; ``devices`` names them, e.g. for a test on the CPU)."""
    gpus = gpus or gpus_in_use()
    if gpus <= 1:
        return {"": (devices or ["cuda"])[0]}
    import torch

    if devices is None and torch.cuda.device_count() < gpus:
        raise RuntimeError(f"model.gpus is {gpus} but this machine shows {torch.cuda.device_count()} CUDA device(s): set model.gpus "
                           f"to {max(1, torch.cuda.device_count())} (or use the one-GPU preset, kaggle_t4_single)")
    local = Path(source) / "config.json"
    if local.exists():
        config = json.loads(local.read_text())
    else:  # a hub id: its config alone (a few kB), before the weights
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source)).to_dict()
    parts = parts_of(config)
    return device_map(balanced_layers(*parts.part_bytes(bits), parts.layers, gpus), devices)


def gpu_bytes(parts: Parts, layers_per_gpu: Sequence[int], bits: int = 16) -> list[float]:
    """Weight bytes on each GPU under a split."""
    first, layer, last = parts.part_bytes(bits)
    loads = [count * layer for count in layers_per_gpu]
    loads[0] += first
    loads[-1] += last
    return loads


# Terms of a stage's memory plan (``medcomp.plan``) that live with the blocks: each GPU holds its blocks' share.
PER_BLOCK_TERMS = ("KV cache", "LoRA")


def gpu_peaks(terms: dict[str, int], parts: Parts, layers_per_gpu: Sequence[int], bits: int = 16) -> list[float]:
    """Each GPU's planned peak for a plan's ``terms`` under a split: the weights exactly (``gpu_bytes``), the KV
    cache and LoRA's state by the GPU's share of blocks, and every other term (a block's activations, the
    logits) wholly on each GPU: each GPU runs its own blocks, so this is an upper bound, not a sum."""
    weights = gpu_bytes(parts, layers_per_gpu, bits)
    blocks = sum(layers_per_gpu) or 1
    peaks = []
    for gpu, count in enumerate(layers_per_gpu):
        peak = 0.0
        for name, value in terms.items():
            if name.startswith("weights"):
                peak += weights[gpu]
            elif name.startswith(PER_BLOCK_TERMS):
                peak += value * count / blocks
            else:
                peak += value
        peaks.append(peak)
    return peaks
