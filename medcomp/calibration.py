"""Calibration data for 4-bit quantization, and the activations AWQ reads (paper section 3.4, Figure 4).

Calibration conversations come from the training set, images included, so the activations are the
multimodal ones. ``calibration_activations`` captures one layer's ``q_proj`` outputs and input-channel
magnitudes (Figure 4) and refuses data on which any decoder layer's output is not finite: a known AWQ
failure on LLaVA is a silently broken model from non-finite scales.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from medcomp.data import VQAExample, load_rgb
from medcomp.loading import QuantizationError, decoder_layers, load_llava, load_processor, release_accelerator_memory, to_model


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


# torch.quantile refuses more values than this; a sample of this size puts the 99.9th percentile within
# a hair of the whole's, and keeps 7B activations (64 conversations x ~650 tokens x 4096) off the GPU.
MAX_CAPTURED_VALUES = 2**24


def evenly_spaced_rows(rows: torch.Tensor, max_values: int) -> torch.Tensor:
    """``rows`` itself when it holds at most ``max_values`` values, else every k-th row so that it does."""
    if rows.numel() <= max_values:
        return rows
    step = -(-rows.numel() // max_values)
    return rows[::step]


@torch.inference_mode()
def calibration_activations(model, processor, conversations: Sequence[list[dict[str, Any]]], layer: int,
                            max_values: int = MAX_CAPTURED_VALUES) -> dict[str, Any]:
    """Run the calibration conversations through ``model`` and return, for decoder layer ``layer``,
    ``q_proj``'s outputs and the per-channel mean magnitude of its inputs (what AWQ scales by: Figure 4).

    Everything returned is on the CPU in fp32; ``q_proj_output`` is every row when they hold at most
    ``max_values`` values, else evenly spaced rows (``values seen`` counts them all). Raises
    ``QuantizationError`` naming the first decoder layer whose output holds NaN or inf.
    """
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range for {len(layers)} decoder layers")
    non_finite: list[int] = []
    captured: dict[str, list[Any]] = {"q_out": [], "q_in": [], "rows": []}

    def check(index):
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not non_finite and not torch.isfinite(hidden).all():
                non_finite.append(index)
        return hook

    def capture(module, inputs, output):
        captured["q_in"].append(inputs[0].reshape(-1, inputs[0].shape[-1]).abs().float().sum(dim=0).cpu())
        captured["rows"].append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0])
        captured["q_out"].append(evenly_spaced_rows(output.reshape(-1, output.shape[-1]), max_values // len(conversations)).float().cpu())

    handles = [block.register_forward_hook(check(i)) for i, block in enumerate(layers)]
    handles.append(layers[layer].self_attn.q_proj.register_forward_hook(capture))
    try:
        for conversation in conversations:
            text = processor.apply_chat_template([_without_inline_image(m) for m in conversation])
            image = load_rgb(next(item["image"] for item in conversation[0]["content"] if item["type"] == "image"))
            model(**to_model(processor(text=text, images=image, return_tensors="pt"), model))
    finally:
        for handle in handles:
            handle.remove()
    if non_finite:
        raise QuantizationError(f"decoder layer {non_finite[0]} produces NaN/inf on the calibration data: "
                                "quantizing with these activations would give non-finite scales")
    q_out = torch.cat(captured["q_out"])
    return {"layer": layer, "q_proj_output": evenly_spaced_rows(q_out, max_values), "values seen": sum(captured["rows"]) * q_out.shape[-1],
            "input_channel_magnitude": torch.stack(captured["q_in"]).sum(dim=0) / sum(captured["rows"])}


def _without_inline_image(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, str):
        return message
    return {**message, "content": [{"type": "image"} if item["type"] == "image" else item for item in content]}


def check_finite_activations(source: str, conversations: Sequence[list[dict[str, Any]]], dtype: str = "float32", device: str = "cpu") -> None:
    """Refuse to quantize ``source`` if any decoder layer's output on the calibration data is not finite
    (run where the model will be quantized: on the CPU a 7B fp16 model takes hours)."""
    model = load_llava(source, dtype=dtype, device=device)
    try:
        calibration_activations(model, load_processor(source), conversations, len(decoder_layers(model)) - 1)
    finally:
        del model
        release_accelerator_memory()


def with_images_loaded(conversations: Sequence[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The conversations with each image path replaced by the picture itself."""
    return [[{**m, "content": [{**item, "image": load_rgb(item["image"])} if isinstance(item, dict) and item.get("type") == "image" else item
                               for item in m["content"]]} if not isinstance(m["content"], str) else m for m in conversation]
            for conversation in conversations]


def describe_conversation(conversation) -> str:
    """Text and image content of a calibration conversation, for the reuse record."""
    images = [hashlib.sha256(Path(item["image"]).read_bytes()).hexdigest()[:16] for item in conversation[0]["content"] if item["type"] == "image"]
    return json.dumps([_without_inline_image(m) for m in conversation] + images, sort_keys=True)
