"""Shared fixtures: tiny data and tiny models built once per test session, all offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch



@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from medcomp.synthetic import generate_dermnet_like

    return generate_dermnet_like(tmp_path_factory.mktemp("data") / "dermnet", train_per_disease=3, test_per_disease=2, image_size=32, seed=1)


def _tiny_llama(vocab_size: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)
    config.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config))


@pytest.fixture(scope="session")
def tiny_embedded_model(tmp_path_factory) -> Path:
    """The embedded recipe (SmolLM2 tokenizer and ChatML template) around a 4-layer random Llama."""
    from transformers import CLIPVisionConfig

    from medcomp.embedded import EMBEDDED_CHAT_TEMPLATE, assemble_llava, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32)
    model, processor = assemble_llava(_tiny_llama(len(tokenizer) + 1), tokenizer, vision, EMBEDDED_CHAT_TEMPLATE, "<|im_end|>")
    target = tmp_path_factory.mktemp("models") / "tiny-embedded"
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_llava15_standin(tmp_path_factory) -> Path:
    """llava-1.5-7b's own config scaled down: CLIP tower, layer -2 features, 'default' selection, Llama.

    Lets the real-scale path (kaggle_t4.yaml: fp16 weights, nf4, LoRA only, gradient checkpointing)
    run here, so wiring errors surface on CPU and not on a user's GPU.
    """
    from transformers import CLIPVisionConfig

    from medcomp.embedded import assemble_llava, smollm2_tokenizer

    from medcomp.plan import real_config
    from medcomp.standin import llava15_chat_template

    real = real_config()
    text, vision = real["text_config"], real["vision_config"]
    scale = 64
    vision_config = CLIPVisionConfig(
        hidden_size=vision["hidden_size"] // scale * 2,
        intermediate_size=vision["intermediate_size"] // scale * 2,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=vision["image_size"] // 12,  # 28 px: 2x2 patches of 14, as 336 px gives 24x24
        patch_size=vision["patch_size"],
        projection_dim=vision["projection_dim"] // scale,
    )
    tokenizer = smollm2_tokenizer()  # no Llama tokenizer is reachable offline; the template is llava-1.5's
    text_model = _tiny_llama(
        len(tokenizer) + 1,
        hidden_size=text["hidden_size"] // scale,
        intermediate_size=text["intermediate_size"] // scale,
        rms_norm_eps=text["rms_norm_eps"],
    )
    template = llava15_chat_template()
    model, processor = assemble_llava(text_model, tokenizer, vision_config, template, tokenizer.eos_token)
    assert model.config.vision_feature_layer == real["vision_feature_layer"]
    assert model.config.vision_feature_select_strategy == real["vision_feature_select_strategy"]
    target = tmp_path_factory.mktemp("models") / "tiny-llava-1.5"
    model.to(torch.float16).save_pretrained(target)
    processor.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_qwen2_llava(tmp_path_factory) -> Path:
    """The embedded recipe around a 4-layer random Qwen2 (its config carries ``layer_types``)."""
    from transformers import CLIPVisionConfig, Qwen2Config, Qwen2ForCausalLM

    from medcomp.embedded import EMBEDDED_CHAT_TEMPLATE, assemble_llava, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    text = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=len(tokenizer) + 1, max_position_embeddings=512))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32)
    model, processor = assemble_llava(text, tokenizer, vision, EMBEDDED_CHAT_TEMPLATE, "<|im_end|>")
    target = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
