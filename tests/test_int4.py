"""The float-offset int4 format and QA-LoRA's exact fold (medcomp.int4, medcomp.qalora): issue 31's property
"the merged 4-bit model computes what was trained", each part checked against an independent computation."""

from __future__ import annotations

import pytest
import torch

from medcomp import int4, loading
from medcomp.loading import decoder_layers, load_llava, load_processor


def test_awq_gemm_tensors_convert_to_the_weights_gptqmodel_dequantizes():
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    generator = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (128, 12), dtype=torch.int32, generator=generator)  # any bits are valid nibbles
    qzeros = torch.randint(-2**31, 2**31 - 1, (2, 12), dtype=torch.int32, generator=generator)
    scales = (torch.rand(2, 96, generator=generator) * 0.02 + 0.001).half()
    reference = dequantize_gemm(qweight, qzeros, scales, 4, 64).float().t()  # GPTQModel's own AWQ dequantization, (out, in)
    converted = int4.Int4Linear.from_awq(qweight, qzeros, scales, 64).dequantized()
    assert converted.shape == (96, 128)
    torch.testing.assert_close(converted, reference, rtol=1e-3, atol=1e-4)  # GPTQModel computes in fp16, the format in fp32


def test_round_to_nearest_and_the_cpu_kernel_compute_the_stored_weights():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    layer = int4.Int4Linear.from_weight(weight, 64)
    assert 0.02 < float((layer.dequantized() - weight).norm() / weight.norm()) < 0.15  # a 4-bit grid, not a copy
    x = torch.randn(5, 128)
    exact = x @ layer.dequantized().t()
    layer.exact = True
    torch.testing.assert_close(layer(x), exact)
    layer.exact = False  # the bf16 int4 kernel: a swapped nibble or zero convention would be off by whole steps
    assert float((layer(x) - exact).norm() / exact.norm()) < 1e-2


def test_a_pooled_adapter_is_a_group_constant_change_and_folds_exactly():
    torch.manual_seed(1)
    layer = int4.Int4Linear.from_weight(torch.randn(64, 192), 64)
    layer.adapter = int4.LowRankAdapter(192, 64, r=4, alpha=8, pool=64).eval()
    torch.nn.init.normal_(layer.adapter.lora_B)
    a, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
    dense_change = (8 / 4) * b @ a.repeat_interleave(64, dim=1) / 64  # independent: the pooled A spread over its group
    x = torch.randn(7, 192)
    layer.exact = True
    trained = layer(x)
    torch.testing.assert_close(trained, x @ (layer.dequantized() + dense_change).t(), rtol=1e-5, atol=1e-5)
    layer.fold_adapter()
    assert layer.adapter is None
    assert float((layer(x) - trained).detach().norm() / trained.norm()) < 1e-6  # one fp32 rounding, nothing more

    unpooled = int4.Int4Linear.from_weight(torch.randn(64, 192), 64)
    unpooled.adapter = int4.LowRankAdapter(192, 64, r=4, alpha=8, pool=1)
    with pytest.raises(ValueError, match="serve it unmerged"):
        unpooled.fold_adapter()


def test_an_int4_model_with_unmerged_adapters_reloads_with_identical_logits(tiny_embedded_model, tmp_path):
    model = int4.round_to_nearest(load_llava(str(tiny_embedded_model)), 64)
    int4.attach_adapters(model, r=4, alpha=8, pooled=False)
    for _, module in int4.int4_linears(model):
        torch.nn.init.normal_(module.adapter.lora_B, std=0.05)
    model.eval()
    loading.assert_decoder_quantized(model)
    saved = int4.save_int4(model, load_processor(str(tiny_embedded_model)), tmp_path / "int4")
    reloaded = loading.load_variant(type("V", (), {"extra": {"format": "int4"}, "path": str(saved)})())
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert sum(1 for _, m in int4.int4_linears(reloaded) if m.adapter is not None) == 4 * 7
    assert loading.decoder_bytes(reloaded) < 0.5 * loading.decoder_bytes(load_llava(str(tiny_embedded_model)))


def test_qa_lora_trains_on_the_grid_then_merges_into_a_plain_4bit_model(tiny_embedded_model, synthetic_root, tmp_path):
    from medcomp import qalora
    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG
    from medcomp.params import FinetuneParams, LoraParams

    processor = load_processor(str(tiny_embedded_model))
    grid = int4.save_int4(int4.round_to_nearest(load_llava(str(tiny_embedded_model)), 64), processor, tmp_path / "grid")
    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    examples = build_conversations([image for image in scan.images if image.split == "train"])[:8]
    params = FinetuneParams(quantization="none", compute_dtype="float32", lora=LoraParams(r=4, alpha=8, dropout=0.0), fully_trained_modules=[], multi_turn=False,
                            max_steps=3, batch_size=4, learning_rate=5e-2, logging_steps=1, save_steps=50)
    trained = qalora.train_on_grid(grid, str(tiny_embedded_model), "cpu", examples, params, tmp_path / "train", seed=0, pooled=True)
    assert trained.steps == 3 and trained.trainable_parameters == sum(
        m.adapter.lora_A.numel() + m.adapter.lora_B.numel() for _, m in int4.int4_linears(trained.model))
    assert max(float(m.adapter.lora_B.abs().max()) for _, m in int4.int4_linears(trained.model)) > 0, "the adapters did not train"
    codes = {name: m.qweight.clone() for name, m in int4.int4_linears(trained.model)}
    exactness = qalora.fold_exactness(trained.model, processor, examples[:3])
    assert exactness["adapters folded"] == 4 * 7
    assert exactness["fold error"] < 1e-5  # the property QA-LoRA exists for: the merge loses nothing
    assert 0 < exactness["served error"] < 2e-2  # bf16 kernel
    assert all(torch.equal(codes[name], m.qweight) for name, m in int4.int4_linears(trained.model)), "the fold touched the 4-bit codes"
    merged = int4.load_int4(int4.save_int4(trained.model, processor, tmp_path / "merged"))
    assert all(m.adapter is None for _, m in int4.int4_linears(merged)) and len(decoder_layers(merged)) == 4


def test_a_checkpoint_holding_only_one_of_tied_embeddings_loads_both(tiny_embedded_model):
    """GPTQModel saves a tied model's lm_head only, safetensors keeps one copy of a shared tensor: either way the
    other key gets the same tensor, so no weight stays on the meta device (the embedded SmolLM2 ties them)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_embedded_model)
    config.get_text_config().tie_word_embeddings = True
    skeleton = int4._skeleton(config)
    weight = torch.randn(skeleton.lm_head.weight.shape)
    for present in ("lm_head.weight", "model.language_model.embed_tokens.weight"):
        state = int4._with_tied_embeddings(skeleton, {present: weight})
        assert set(state) == {"lm_head.weight", "model.language_model.embed_tokens.weight"} and all(v is weight for v in state.values())
    config.get_text_config().tie_word_embeddings = False
    assert set(int4._with_tied_embeddings(int4._skeleton(config), {"lm_head.weight": weight})) == {"lm_head.weight"}
