"""4-bit quantization on tiny models: really quantized, loud on bad input, AWQ better than RTN on outliers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medcomp import calibration, loading, quantizers, weight_analysis
from medcomp.stages import quantize as quantize_stage
from medcomp.data import build_conversations, scan_dermnet, DERMNET_FOLDER_RULES
from medcomp.knowledge import DISEASES_BY_SLUG
from medcomp.loading import decoder_layers, load_llava, load_processor, save_with_processor


def relative_errors(model, reference) -> dict[str, float]:
    """Relative Frobenius error of each decoder linear against ``reference``: zero means not quantized."""
    return {f"{row['layer']}.{row['linear']}": float((row["weight"] - row["reference"]).norm() / row["reference"].norm())
            for row in weight_analysis.weight_comparisons(model, reference)}


@pytest.fixture(scope="module")
def conversations(synthetic_root):
    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    examples = build_conversations([image for image in scan.images if image.split == "train"])
    return calibration.calibration_conversations(examples, 6, seed=0)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory) -> Path:
    """A tiny LLaVA whose every linear has a multiple of 64 outputs (AWQ's clip search needs it), with
    a few planted outlier input channels into layer 0's attention (through its norm)."""
    from conftest import _tiny_llama
    from transformers import CLIPVisionConfig

    from medcomp.embedded import EMBEDDED_CHAT_TEMPLATE, assemble_llava, smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16, projection_dim=32)
    model, processor = assemble_llava(_tiny_llama(len(tokenizer) + 1, num_key_value_heads=4), tokenizer, vision, EMBEDDED_CHAT_TEMPLATE, "<|im_end|>")
    with torch.no_grad():
        decoder_layers(model)[0].input_layernorm.weight[[3, 17, 40]] = 25.0
    return save_with_processor(model, processor, tmp_path_factory.mktemp("models") / "outliers")


def test_calibration_conversations_carry_their_images_and_answers(conversations):
    first = conversations[0]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert any(item["type"] == "image" and Path(item["image"]).exists() for item in first[0]["content"])
    loaded = calibration.with_images_loaded(conversations)[0]
    assert any(item["type"] == "image" and hasattr(item["image"], "size") for item in loaded[0]["content"])
    with pytest.raises(ValueError, match="calibration_size"):
        calibration.calibration_conversations([], 1)


def test_bitsandbytes_quantizes_every_decoder_linear_in_blocks_of_64(tiny_embedded_model, tmp_path):
    checkpoint = quantizers.quantize("bnb", str(tiny_embedded_model), tmp_path / "bnb", [])
    model = loading.load_quantized(checkpoint.path)
    for layer in decoder_layers(model):
        assert layer.self_attn.q_proj.weight.quant_state.blocksize == 64
        assert layer.mlp.down_proj.weight.quant_state.quant_type == "nf4"
    errors = relative_errors(model, load_llava(str(tiny_embedded_model)))
    assert len(errors) == 4 * 7 and min(errors.values()) > 1e-3, "a linear came back unchanged: not quantized"
    assert quantizers.quantize("bnb", str(tiny_embedded_model), tmp_path / "bnb", []).reused


def test_an_unquantized_decoder_is_refused_naming_the_layer(tiny_embedded_model):
    with pytest.raises(loading.QuantizationError, match="decoder layer 0 q_proj is not quantized"):
        loading.assert_decoder_quantized(load_llava(str(tiny_embedded_model)))


def test_non_finite_calibration_activations_name_the_layer(tiny_embedded_model, conversations, tmp_path):
    model = load_llava(str(tiny_embedded_model))
    with torch.no_grad():
        decoder_layers(model)[2].mlp.up_proj.weight[0, 0] = float("inf")
    broken = save_with_processor(model, load_processor(str(tiny_embedded_model)), tmp_path / "broken")
    with pytest.raises(loading.QuantizationError, match="decoder layer 2 produces NaN/inf"):
        quantizers.quantize("awq", str(broken), tmp_path / "awq", conversations)
    assert not (tmp_path / "awq").exists(), "nothing is written for a refused model"


@pytest.fixture(scope="module")
def outlier_checkpoints(outlier_model, conversations, tmp_path_factory) -> dict[str, Path]:
    """The outlier model quantized by AWQ and by RTN (GPTQModel, group size 64), once per module."""
    folder = tmp_path_factory.mktemp("quantized")
    return {method: quantizers.quantize(method, str(outlier_model), folder / method, conversations).path for method in ("awq", "rtn")}


@pytest.mark.slow
def test_awq_beats_round_to_nearest_on_outlier_channels_and_both_reload_quantized(outlier_model, outlier_checkpoints, conversations):
    processor = load_processor(str(outlier_model))
    reference = load_llava(str(outlier_model))
    truth = calibration.calibration_activations(reference, processor, conversations, 0)["q_proj_output"]
    errors = {}
    for method in ("awq", "rtn"):
        checkpoint = quantizers.QuantizedCheckpoint(outlier_checkpoints[method], method, 0.0, True)
        config = json.loads((checkpoint.path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "awq" and config["group_size"] == 64 and config["bits"] == 4
        model = loading.load_quantized(checkpoint.path)  # asserts every decoder linear is 4-bit
        assert min(relative_errors(model, reference).values()) > 1e-4
        output = calibration.calibration_activations(model, processor, conversations, 0)["q_proj_output"]
        # AWQ divides layer 0's q_proj input by its scales (folded into the norm); compare what attention sees
        errors[method] = float((output - truth).norm() / truth.norm())
    assert errors["awq"] < errors["rtn"], errors


@pytest.mark.slow
def test_dequantized_serving_holds_the_kernels_4bit_weights_and_norms(outlier_model, outlier_checkpoints, conversations):
    """``dequantized_model`` against GPTQModel's int4 kernel: the same 4-bit weights (the kernel's, probed on
    the identity, agree to its bf16 rounding), AWQ's folded norms, and the same layer outputs to bf16."""
    processor = load_processor(str(outlier_model))
    reference = load_llava(str(outlier_model))
    for method, checkpoint in outlier_checkpoints.items():
        kernel = loading.load_quantized(checkpoint)
        dense = weight_analysis.dequantized_model(checkpoint, outlier_model)
        assert not any(loading.is_quantized_linear(m) for m in dense.modules())
        for layer_kernel, layer_dense, layer_reference in zip(decoder_layers(kernel), decoder_layers(dense), decoder_layers(reference)):
            for name in loading.DECODER_LINEARS:
                served = weight_analysis.effective_weight(loading.find_linear(layer_kernel, name))
                weight = loading.find_linear(layer_dense, name).weight.detach()
                assert float((weight - served).norm() / served.norm()) < 1e-2, (method, name)
                original = loading.find_linear(layer_reference, name).weight.detach()
                assert float((weight - original).norm() / original.norm()) > 1e-4  # really the 4-bit weights
            assert torch.equal(layer_dense.input_layernorm.weight.float(), layer_kernel.input_layernorm.weight.float())
        if method == "awq":  # AWQ divided the planted outliers' norm weights by its scales
            assert not torch.equal(decoder_layers(dense)[0].input_layernorm.weight, decoder_layers(reference)[0].input_layernorm.weight)
        served = calibration.calibration_activations(kernel, processor, conversations, 0)["q_proj_output"]
        computed = calibration.calibration_activations(dense, processor, conversations, 0)["q_proj_output"]
        assert float((computed - served).norm() / served.norm()) < 2e-2, method
    with pytest.raises(loading.QuantizationError, match="not an AWQ GEMM"):
        weight_analysis.dequantized_model(outlier_model, outlier_model)


def test_adapter_deltas_are_scaled_lora_products(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(4, 64), torch.randn(64, 4)
    save_file({"base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_B.weight": b}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    deltas = weight_analysis.adapter_deltas(tmp_path)
    assert set(deltas) == {(3, "q_proj")}
    assert torch.allclose(deltas[(3, "q_proj")], 0.5 * b @ a)


def test_the_plan_covers_every_cell_of_tables_3_to_5():
    from medcomp.params import QuantizationParams
    from medcomp.runs import Variant

    variants = {name: Variant(name, "x", "p", parent=parent, extra=extra) for name, parent, extra in [
        ("finetuned", None, {"adapter": "a", "sft_base": "b"}), ("pruned-7", "finetuned", {}), ("pruned-7-magnitude", "finetuned", {}),
        ("recovered-7", "pruned-7", {"adapter": "a", "sft_base": "b"}), ("recovered-9", "pruned-9", {"adapter": "a", "sft_base": "b"}),
        ("recovered-7-magnitude", "pruned-7-magnitude", {"adapter": "a", "sft_base": "b"})]}
    plan = quantize_stage.quantization_plan(QuantizationParams(), variants, ["recovered-7", "recovered-9", "recovered-7-magnitude"])
    names = {step.name for step in plan}
    assert names == {"finetuned-awq", "finetuned-bnb", "recovered-7-awq", "recovered-7-bnb", "recovered-9-awq", "recovered-9-bnb",  # Table 3
                     "pruned-7-awq",  # Table 4: prune + quant
                     "recovered-7-rtn", "recovered-7-magnitude-awq"}  # Table 5; the models that keep the finetune are 08's
    assert len(names) == len(plan)

    from medcomp.params import BeyondParams
    from medcomp.stages import beyond

    registered = {**variants, **{n: Variant(n, "05_quantize", "p") for n in names}}
    steps = beyond.beyond_plan(BeyondParams(), registered, ["recovered-7", "recovered-9", "recovered-7-magnitude"])
    assert [(s.name, s.grid) for s in steps] == [("finetuned-gptq", None), ("recovered-7-gptq", None), ("finetuned-qlora", None), ("recovered-7-qlora", None),
        ("finetuned-awq-qalora", "finetuned-awq"), ("recovered-7-awq-qalora", "recovered-7-awq"),  # the pipeline model: the first level only
        ("finetuned-awq-lora", "finetuned-awq"), ("recovered-7-awq-lora", "recovered-7-awq"),
        ("recovered-7-awq-qalora-kd", "recovered-7-awq")]  # prune, then distil into the 4-bit grid
    with pytest.raises(ValueError, match=r"'finetuned-rtn', which 05 did not build: add 'rtn' to quantization.finetuned"):
        beyond.beyond_plan(BeyondParams(grid="rtn"), registered, ["recovered-7"])


def test_quantization_and_recovery_params_refuse_what_cannot_run():
    from pydantic import ValidationError

    from medcomp.params import QuantizationParams, RecoveryParams

    with pytest.raises(ValidationError, match="group_size must be 32, 64 or 128"):
        QuantizationParams(group_size=48)
    with pytest.raises(ValidationError):
        QuantizationParams(finetuned=("gptq",))
    with pytest.raises(ValidationError, match="distinct, increasing fractions"):
        RecoveryParams(levels=(0.3, 0.2))


def test_recovery_plan_names_what_03_did_not_build():
    from medcomp.params import PAPER_PRUNING_LEVELS, RecoveryParams
    from medcomp.stages.recover import recovery_plan

    # on 30 layers the paper's levels map to 0, 2, 4, 7, 8, 9, 10 blocks (as 03 maps them)
    steps = recovery_plan(RecoveryParams(), PAPER_PRUNING_LEVELS, 30, 27, ["finetuned", "pruned-7", "pruned-9", "pruned-7-magnitude"])
    assert [(s.pruned, s.recovered, s.fraction) for s in steps] == [
        ("pruned-7", "recovered-7", 7 / 32), ("pruned-9", "recovered-9", 9 / 32), ("pruned-7-magnitude", "recovered-7-magnitude", None)]
    with pytest.raises(ValueError, match="was not built by 03_prune; built: \\['pruned-7'\\]"):
        recovery_plan(RecoveryParams(), PAPER_PRUNING_LEVELS, 30, 27, ["finetuned", "pruned-7"])


def test_survival_is_one_when_the_change_is_kept_and_zero_when_rounded_away(tiny_embedded_model, tmp_path):
    from safetensors.torch import save_file

    base, merged = load_llava(str(tiny_embedded_model)), load_llava(str(tiny_embedded_model))
    torch.manual_seed(0)
    lora_a, lora_b = 0.01 * torch.randn(2, 64), 0.01 * torch.randn(64, 2)
    save_file({"base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight": lora_a,
               "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight": lora_b}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    delta = 2 * lora_b @ lora_a
    half, noisy = load_llava(str(tiny_embedded_model)), load_llava(str(tiny_embedded_model))
    with torch.no_grad():
        decoder_layers(merged)[1].self_attn.q_proj.weight += delta
        decoder_layers(half)[1].self_attn.q_proj.weight += 0.5 * delta  # half the change survived
        noise = torch.randn_like(delta)
        noise -= (noise.flatten() @ delta.flatten()) / (delta.flatten() @ delta.flatten()) * delta  # orthogonal to the change
        decoder_layers(noisy)[1].self_attn.q_proj.weight += delta + noise * (delta.norm() / noise.norm())  # all of it, plus as much noise
    frames = {name: weight_analysis.finetune_survival(model, merged, tmp_path) for name, model in
              {"kept": merged, "half": half, "erased": base, "noisy": noisy}.items()}
    assert list(frames["kept"]["linear"]) == ["q_proj"] and list(frames["kept"]["layer"]) == [1]
    expected = {"kept": (1.0, 1.0), "half": (0.5, 1.0), "erased": (0.0, None), "noisy": (1.0, 2 ** -0.5)}
    for name, (kept, cosine) in expected.items():
        assert frames[name]["kept"].item() == pytest.approx(kept, abs=2e-3), name
        if cosine is not None:
            assert frames[name]["cosine"].item() == pytest.approx(cosine, abs=2e-3), name
    assert 0 < frames["kept"]["delta / step"].item() < 1 and 0 <= frames["kept"]["below half a step"].item() <= 1


def test_a_quantizer_failure_is_an_error_that_names_the_cause_not_a_dead_kernel(tiny_embedded_model, conversations, tmp_path):
    # AWQ's clip search needs a multiple of 64 outputs; this model's k_proj has 32
    with pytest.raises(loading.QuantizationError, match="awq quantization of .* failed") as failure:
        quantizers.quantize("awq", str(tiny_embedded_model), tmp_path / "awq", conversations)
    assert "AssertionError" in str(failure.value)
    assert not (tmp_path / "awq").exists()


def test_row_dropping_answers_equal_generate_on_every_kind_of_4bit_model(outlier_model, conversations, synthetic_root, tmp_path):
    """05 answers with ``evaluation.greedy_tokens`` on GPTQModel's int4 layers, bitsandbytes nf4 and a
    peft adapter over nf4: its row-dropping cache works through each, and gives ``generate``'s tokens."""
    from peft import LoraConfig, get_peft_model

    from medcomp.data import load_rgb, select_split
    from medcomp.evaluation import greedy_tokens
    from medcomp.loading import to_model

    processor = load_processor(str(outlier_model))
    processor.tokenizer.padding_side = "left"
    examples = build_conversations(select_split(scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES).images, "test", total=2))
    texts = [processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True) for e in examples]
    awq = loading.load_quantized(quantizers.quantize("awq", str(outlier_model), tmp_path / "awq", conversations).path)
    nf4 = load_llava(str(outlier_model), quantization_config=loading.bnb_4bit_config("float32", loading.FULL_PRECISION_MODULES))
    adapter = get_peft_model(load_llava(str(outlier_model), quantization_config=loading.bnb_4bit_config("float32", loading.FULL_PRECISION_MODULES)),
                             LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    for kind, model in {"awq": awq, "nf4": nf4, "nf4 + adapter": adapter}.items():
        model.eval()
        inputs = to_model(processor(text=texts, images=[load_rgb(e.image) for e in examples], return_tensors="pt", padding=True), model)
        start = inputs["input_ids"].shape[1]
        free = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)[:, start:]
        ends = {int(free[0, 1]), int(free[len(examples) - 1, 4])}  # tokens this model emits: rows end at different steps
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=sorted(ends))[:, start:].tolist()
        expected = [row[: next((i + 1 for i, t in enumerate(row) if t in ends), len(row))] for row in generated]
        assert greedy_tokens(model, inputs, 8, ends) == expected, kind


@pytest.mark.slow
def test_gptq_stores_as_int4_and_compensates_rounding_better_than_rtn(outlier_model, outlier_checkpoints, conversations, tmp_path):
    """GPTQ (GPTQModel, group size 64, natural order) converted into medcomp.int4: every decoder linear within a
    4-bit step of the original (a zero-point read off by one, GPTQ's v1 offset, moves every weight by a whole step),
    and layer 0's q_proj outputs on the calibration data closer to the original's than RTN's (what GPTQ minimises);
    converting 05's RTN checkpoint the same way serves the same function as GPTQModel's own kernel."""
    from medcomp import int4

    checkpoint = quantizers.quantize("gptq", str(outlier_model), tmp_path / "gptq", conversations)
    assert int4.is_int4_checkpoint(checkpoint.path)
    gptq = loading.load_variant(type("V", (), {"extra": {"format": "gptq"}, "path": str(checkpoint.path)})())
    reference = load_llava(str(outlier_model))
    errors = relative_errors(gptq, reference)
    assert len(errors) == 4 * 7 and 1e-4 < max(errors.values()) < 0.2, errors
    processor = load_processor(str(outlier_model))
    truth = calibration.calibration_activations(reference, processor, conversations, 0)["q_proj_output"]
    rtn = int4.from_quantized_checkpoint(outlier_checkpoints["rtn"])
    output = {name: calibration.calibration_activations(model, processor, conversations, 0)["q_proj_output"] for name, model in (("gptq", gptq), ("rtn", rtn))}
    error = {name: float((value - truth).norm() / truth.norm()) for name, value in output.items()}
    assert error["gptq"] < error["rtn"], error
    served = calibration.calibration_activations(loading.load_quantized(outlier_checkpoints["rtn"]), processor, conversations, 0)["q_proj_output"]
    assert float((output["rtn"] - served).norm() / served.norm()) < 1e-2  # the int4 conversion is GPTQModel's function, to bf16


def test_finetune_concentration_finds_the_groups_that_hold_the_change(tiny_embedded_model, tmp_path):
    """A change that lives in one group of 64 inputs of one row is all held by that group; a change spread over
    two linears is checked against a brute-force loop over every group."""
    from safetensors.torch import save_file

    merged = load_llava(str(tiny_embedded_model))
    prefix = "base_model.model.model.language_model.layers"
    q_proj, up_proj = decoder_layers(merged)[1].self_attn.q_proj.weight, decoder_layers(merged)[0].mlp.up_proj.weight
    one_group_a, one_group_b = torch.zeros(1, q_proj.shape[1]), torch.zeros(q_proj.shape[0], 1)
    one_group_a[0, :64], one_group_b[3, 0] = 1.0, 0.01  # row 3, inputs 0-63: one group
    save_file({f"{prefix}.1.self_attn.q_proj.lora_A.weight": one_group_a, f"{prefix}.1.self_attn.q_proj.lora_B.weight": one_group_b},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1}))
    one = weight_analysis.finetune_concentration(merged, tmp_path, 64, spare_bytes=32)  # 32 bytes: one group's 64 × 4 more bits
    assert one["groups at 8 bits"] == 1 and one["top share"] == pytest.approx(1.0)
    assert one["groups"] == q_proj.numel() // 64 and weight_analysis.finetune_concentration(merged, tmp_path, 64)["top share"] == 0.0

    torch.manual_seed(0)
    spread = tmp_path / "spread"
    spread.mkdir()
    factors = {(1, "self_attn.q_proj", q_proj): (torch.randn(2, q_proj.shape[1]), 0.01 * torch.randn(q_proj.shape[0], 2)),
               (0, "mlp.up_proj", up_proj): (torch.randn(2, up_proj.shape[1]), 0.01 * torch.randn(up_proj.shape[0], 2))}
    save_file({f"{prefix}.{layer}.{name}.lora_{ab}.weight": t for (layer, name, _), (a, b) in factors.items() for ab, t in (("A", a), ("B", b))},
              str(spread / "adapter_model.safetensors"))
    (spread / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    energies = []
    for (_, _, weight), (a, b) in factors.items():
        delta, weight = (2 * b @ a).tolist(), weight.detach().tolist()
        for row in range(len(weight)):
            for start in range(0, len(weight[row]), 64):
                group = weight[row][start:start + 64]
                step = (max(group) - min(group)) / 15
                energies.append(sum((delta[row][start + i] / step) ** 2 for i in range(64)))
    energies.sort(reverse=True)
    for groups in (1, 10, len(energies) // 4):
        found = weight_analysis.finetune_concentration(merged, spread, 64, spare_bytes=32 * groups)
        assert found["groups"] == len(energies) and found["groups at 8 bits"] == groups
        assert found["top share"] == pytest.approx(sum(energies[:groups]) / sum(energies), rel=1e-5), groups


@pytest.mark.parametrize("out_features, tokens", [(512, 1100), (192, 300)])  # batches of 256 outputs, of 64; tokens sampled, all
def test_awq_clip_search_matches_gptqmodels(out_features, tokens):
    """``quantizers.awq_best_clip`` (matrix products) against GPTQModel's own ``_compute_best_clip`` (elementwise):
    the same clipping bound for every output channel and group."""
    from gptqmodel import AWQConfig
    from gptqmodel.looper.awq_processor import AWQProcessor

    library = getattr(AWQProcessor, "library_compute_best_clip", AWQProcessor._compute_best_clip)
    processor = AWQProcessor.__new__(AWQProcessor)
    processor.qcfg = AWQConfig(bits=4, group_size=64, sym=False)
    torch.manual_seed(0)
    weight, features = torch.randn(out_features, 128), torch.randn(tokens, 128)
    features[:, 5] *= 20  # an outlier channel: the bound then differs between groups and rows
    ours, theirs = quantizers.awq_best_clip(processor, weight, features), library(processor, weight, features)
    assert ours.shape == theirs.shape == (out_features, 2, 1)
    assert torch.equal(ours, theirs)
    assert len(torch.unique(ours / weight.reshape(out_features, 2, 64).abs().amax(-1, keepdim=True))) > 1  # not all unclipped


def test_a_cpu_search_runs_in_fp32_and_stores_fp16_scales(outlier_model, conversations, tmp_path, monkeypatch):
    """The search's dtype is the device's (fp32 on a CPU, where fp16 GEMM is ~50x slower; fp16 on a GPU), and what is
    stored is what a T4's search stores: fp16 scales. Fails if a GPTQModel upgrade stops casting them."""
    from safetensors import safe_open

    from medcomp import costs

    assert quantizers.search_dtype("cpu") == torch.float32 and quantizers.search_dtype("cuda:0") == torch.float16
    monkeypatch.setenv(costs.LEDGER_ENV, str(tmp_path / "costs.jsonl"))
    checkpoint = quantizers.quantize("awq", str(outlier_model), tmp_path / "awq", conversations[:2])
    [search] = [e for e in costs.read_ledger(tmp_path / "costs.jsonl") if e["kind"] == "search"]  # recorded by the child
    assert search["dtype"] == "float32" and search["name"] == "AWQ search (awq)"
    with safe_open(str(checkpoint.path / "model.safetensors"), "pt") as stored:
        scales = [stored.get_tensor(name) for name in stored.keys() if name.endswith(".scales")]
    assert scales and {tensor.dtype for tensor in scales} == {torch.float16}
    model = loading.load_quantized(checkpoint.path)
    assert costs.model_dtype(model) == "int4"
