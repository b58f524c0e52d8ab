"""A LLaVA-1.5-7B stand-in: the real model's depth, dtype, template and constraints at a width a CPU runs.

No GPU tests the real path for us, so the Kaggle T4 preset runs end to end on this model, in CI and in
``scripts/gpu_rehearsal.sh``. What it keeps of ``llava-hf/llava-1.5-7b-hf`` (its config ships in
``medcomp/reference``): 32 decoder layers, fp16 weights, multi-head attention (as many KV heads as
heads), head dimension 64 or more, llava-1.5's chat template, vision feature layer -2 and "default"
selection. What it shrinks: the widths, so that every dimension 4-bit quantization groups or splits
stays a multiple of 64 as in the 7B model (AWQ refuses ``in_features % group_size != 0``, and its clip
search splits output rows in batches of 64); the vision tower's depth and image size (the tower is never
quantized or pruned). The tokenizer is SmolLM2's, the only one reachable offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medcomp.embedded import assemble_llava, smollm2_tokenizer
from medcomp.files import atomic_directory
from medcomp.plan import REFERENCE, real_config

QUANTIZATION_MULTIPLE = 64  # the group size, and AWQ's clip-search batch of output rows


def llava15_chat_template() -> str:
    return (REFERENCE / "llava-1.5-chat_template.jinja").read_text().strip()


def standin_text_config(hidden_size: int = 128, heads: int = 2, layers: int | None = None) -> dict[str, Any]:
    """The stand-in's language model: the real one's depth and norms, ``hidden_size`` wide, the real
    intermediate/hidden ratio rounded up to a multiple of 64."""
    real = real_config()["text_config"]
    ratio = real["intermediate_size"] / real["hidden_size"]
    intermediate = -(-round(hidden_size * ratio) // QUANTIZATION_MULTIPLE) * QUANTIZATION_MULTIPLE
    config = {"hidden_size": hidden_size, "intermediate_size": intermediate, "num_hidden_layers": layers or real["num_hidden_layers"],
              "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": real["rms_norm_eps"],
              "max_position_embeddings": 512}
    for name in ("hidden_size", "intermediate_size"):
        if config[name] % QUANTIZATION_MULTIPLE:
            raise ValueError(f"{name} {config[name]} is not a multiple of {QUANTIZATION_MULTIPLE}: 4-bit quantization would refuse it")
    if hidden_size // heads < 64:
        raise ValueError(f"head dimension {hidden_size // heads} < 64: k_proj/v_proj would have fewer than 64 output rows per head")
    return config


def build_llava15_standin(target: Path | str, layers: int | None = None, hidden_size: int = 128, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` the stand-in (fp16) with its processor at ``target``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

    real = real_config()
    vision = real["vision_config"]
    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    text_model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 1, **standin_text_config(hidden_size, layers=layers)))
    vision_config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=vision["patch_size"] * 2, patch_size=vision["patch_size"], projection_dim=64)
    model, processor = assemble_llava(text_model, tokenizer, vision_config, llava15_chat_template(), tokenizer.eos_token, seed)
    if (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) != (real["vision_feature_layer"], real["vision_feature_select_strategy"]):
        raise AssertionError("the stand-in must read the vision tower as llava-1.5 does")
    with atomic_directory(Path(target)) as staging:
        model.to(torch.float16).save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(target)
