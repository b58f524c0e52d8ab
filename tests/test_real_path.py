"""The Kaggle T4 path's crash sites, each shown on the CPU, and the T4 plan checked against real tensors.

Each test here fails without its fix: a CPU can show a dtype mismatch, an fp16 overflow, a tensor
limit or a device argument that was dropped, even where only a GPU would have crashed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medcomp import calibration, evaluation, forecast, importance, loading, plan, weight_analysis
from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES
from medcomp.params import load_params


@pytest.fixture(scope="module")
def fp16_standin(tmp_path_factory):
    """LLaVA-1.5-7B's architecture at 4 of its 32 layers (the depth does not matter here), fp16."""
    from medcomp.standin import build_llava15_standin

    return build_llava15_standin(tmp_path_factory.mktemp("models") / "standin-4", layers=4)


@pytest.fixture(scope="module")
def examples(synthetic_root):
    scan = scan_dermnet(synthetic_root, tuple(d.slug for d in DISEASES), DERMNET_FOLDER_RULES)
    return build_conversations(select_split(scan.images, "train"))


def test_magnitude_scores_accumulate_fp16_weights_in_fp32():
    block = torch.nn.Linear(256, 256, bias=False).half()
    torch.nn.init.constant_(block.weight, 2.0)  # |W| sums to 131,072: past fp16's 65,504
    model = type("M", (), {})()
    layers = torch.nn.ModuleList([block, torch.nn.Linear(256, 256, bias=False).half()])
    torch.nn.init.constant_(layers[1].weight, 1.0)
    model.model = type("Inner", (), {"language_model": type("LM", (), {"layers": layers})()})()
    scores = importance.magnitude_scores(model, [0, 1])
    assert scores[0] == pytest.approx(131072.0) and scores[1] == pytest.approx(65536.0)
    assert importance.ranking(scores, higher_is_less_important=False) == [1, 0]


def test_forward_only_criteria_move_cpu_batches_to_an_fp16_model(fp16_standin, examples):
    model = loading.load_llava(str(fp16_standin), dtype="float16")
    processor = loading.load_processor(str(fp16_standin))
    calibration_set = examples[:2]
    batches = importance.teacher_forced_batches(processor, calibration_set, 2)
    assert batches[0]["pixel_values"].dtype == torch.float32  # as the processor gives them
    influence = importance.block_influence(model, processor, calibration_set, [1, 2], batches=batches)
    perplexity = importance.reference_perplexity(model, processor, calibration_set, batches=batches)
    assert influence.notna().all() and perplexity > 1


def test_to_model_puts_floats_in_the_models_dtype_and_keeps_ids_whole(fp16_standin):
    model = loading.load_llava(str(fp16_standin), dtype="float16")
    moved = loading.to_model({"pixel_values": torch.zeros(1, 3, 2, 2), "input_ids": torch.ones(1, 3, dtype=torch.long), "answer_span": 3}, model)
    assert moved["pixel_values"].dtype == torch.float16 and moved["input_ids"].dtype == torch.long and moved["answer_span"] == 3


def test_effective_weight_probes_an_fp16_layer_in_its_own_dtype():
    layer = torch.nn.Linear(64, 32).half()
    weight = weight_analysis.effective_weight(layer, torch.float16)
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    torch.testing.assert_close(weight, layer.weight.float(), atol=2e-3, rtol=1e-2)


def test_figure_4_capture_is_sampled_on_the_cpu_and_quantile_works(tiny_embedded_model, synthetic_root):
    scan = scan_dermnet(synthetic_root, tuple(d.slug for d in DISEASES), DERMNET_FOLDER_RULES)
    conversations = calibration.calibration_conversations(build_conversations(select_split(scan.images, "train")), 3, seed=0)
    model = loading.load_llava(str(tiny_embedded_model))
    processor = loading.load_processor(str(tiny_embedded_model))
    whole = calibration.calibration_activations(model, processor, conversations, 1)
    sampled = calibration.calibration_activations(model, processor, conversations, 1, max_values=600)
    assert whole["values seen"] == whole["q_proj_output"].numel() == sampled["values seen"]
    assert sampled["q_proj_output"].numel() <= 600 < whole["q_proj_output"].numel()
    assert sampled["q_proj_output"].device.type == "cpu" and sampled["q_proj_output"].dtype == torch.float32
    torch.testing.assert_close(sampled["input_channel_magnitude"], whole["input_channel_magnitude"])
    # 7B: 64 conversations x ~650 tokens x 4096 = 170 M values; older torch refuses quantile past 2^24 values
    rows = torch.arange(2**24 + 64, dtype=torch.float32).reshape(-1, 64)
    kept = calibration.evenly_spaced_rows(rows, 2**24)
    assert kept.numel() <= 2**24 and kept[0, 0] == 0
    assert kept.quantile(0.5) == pytest.approx(float(rows.flatten().median()), rel=1e-3)  # the sample's median is the whole's


class _Loaded(Exception):
    pass


def test_every_variant_kind_loads_onto_the_configured_device(monkeypatch):
    """The QLoRA deployment used to ignore the device: on a T4 it answered on the CPU for hours."""
    from medcomp.runs import Variant

    seen = []

    def fake_load_llava(source, dtype="float32", device="cpu", quantization_config=None):
        seen.append((source, dtype, device))
        raise _Loaded

    monkeypatch.setattr(loading, "load_llava", fake_load_llava)
    monkeypatch.setattr(loading, "load_quantized", lambda path, device="cpu", dtype="float32": fake_load_llava(path, dtype, device))
    for kind in ("qlora", "adapter-on-quantized", "awq", "bnb", None):
        variant = Variant(name="v", stage="s", path="/v", parent=None, extra={"format": kind, "sft_base": "/base", "quantized_base": "/q"})
        with pytest.raises(_Loaded):
            loading.load_variant(variant, "float16", "cuda")
    assert [device for _, _, device in seen] == ["cuda"] * 5
    assert all(dtype == "float16" for _, dtype, _ in seen)


def test_int4_cpu_kernel_gets_fp32_never_fp16():
    assert loading.serving_dtype("awq", "float16", "cpu") == "float32"  # _weight_int4pack_mm_for_cpu refuses Half
    assert loading.serving_dtype("awq", "float16", "cuda") == "float16"
    assert loading.serving_dtype("bnb", "float16", "cpu") == "float16"


def test_finite_check_runs_where_the_model_is_quantized(monkeypatch):
    seen = []

    def fake_load_llava(source, dtype="float32", device="cpu", quantization_config=None):
        seen.append(device)
        raise _Loaded

    monkeypatch.setattr(calibration, "load_llava", fake_load_llava)
    with pytest.raises(_Loaded):
        calibration.check_finite_activations("/m", [], "float16", "cuda")
    assert seen == ["cuda"]


# ------------------------------------------------------------------------------------------ the T4 plan


def test_plan_weights_are_the_bytes_of_the_model_built(fp16_standin):
    config = json.loads((fp16_standin / "config.json").read_text())
    shape = plan.shape_of(config)
    model = loading.load_llava(str(fp16_standin), dtype="float16")
    parameter_bytes = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731  (buffers: a few hundred bytes)
    assert plan.weight_bytes(shape) == parameter_bytes(model)
    assert plan.weight_bytes(shape, layers_removed=1) == parameter_bytes(model) - parameter_bytes(loading.decoder_layers(model)[0])


def test_plan_kv_cache_is_the_cache_a_generate_fills(fp16_standin, examples):
    config = json.loads((fp16_standin / "config.json").read_text())
    shape = plan.shape_of(config)
    model = loading.load_llava(str(fp16_standin), dtype="float16")
    processor = loading.load_processor(str(fp16_standin))
    texts = [processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True) for e in examples[:2]]
    from medcomp.data import load_rgb

    inputs = loading.to_model(processor(text=texts, images=[load_rgb(e.image) for e in examples[:2]], return_tensors="pt", padding=True), model)
    output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = output.past_key_values
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = cache.get_seq_length()
    assert tokens == inputs["input_ids"].shape[1] + 4  # the last new token is never fed back
    assert plan.kv_cache_bytes(shape, 2, tokens) == cached


def test_every_kaggle_t4_stage_plans_within_a_t4():
    """The one-T4 preset (kaggle_t4_single; kaggle_t4 splits over two, tests/test_placement.py)."""
    params = plan.with_batch_sizes(load_params("kaggle_t4_single"))
    shape = plan.shape_of(plan.real_config())
    assert shape.parameters() == pytest.approx(7.06e9, rel=0.01) and shape.image_tokens == 576
    assert plan.weight_bytes(shape) / plan.GIB == pytest.approx(13.16, abs=0.01)
    plans = plan.stage_plans(params, shape)
    order = [p.stage for p in plans]
    assert [stage for i, stage in enumerate(order) if i == 0 or order[i - 1] != stage][-4:] == ["05_quantize", "08_beyond", "06_benchmark", "07_judge"]
    assert {p.stage for p in plans} == {f"0{i}_{s}" for i, s in enumerate(
        ["finetune", "layer_importance", "prune", "sft_pruned", "quantize", "benchmark", "judge", "beyond"], start=1)}
    grid = next(p for p in plans if p.stage == "08_beyond" and p.step.startswith("adapters"))  # the nf4 SFT's terms, AWQ's bytes, one dense linear
    assert grid.terms["one linear dequantized (fp16)"] == 2 * 4096 * 11008 and 4 < grid.peak_bytes / plan.GIB < 8
    gptq = next(p for p in plans if p.stage == "08_beyond" and p.step.startswith("GPTQ"))
    assert gptq.terms["GPTQ Hessian of the widest input (fp32)"] == 4 * 11008 ** 2
    assert gptq.how.startswith("3 models")  # finetuned, recovered and the replaced model
    streamline = next(p for p in plans if p.stage == "08_beyond" and p.step.startswith("LLM-Streamline"))  # one 7B block in fp32 with Adam
    assert streamline.terms["one decoder block, gradients, Adam moments (fp32)"] == 16 * (4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096)
    over = [(p.stage, p.step, round(p.peak_bytes / plan.GIB, 2)) for p in plans if not p.fits()]
    assert not over, over
    assert params.evaluation.batch_size == plan.auto_batch_size(shape, params.evaluation.max_new_tokens) < 8  # batch 8 would need 16.6 GiB


def test_auto_batch_is_the_largest_that_fits():
    shape = plan.shape_of(plan.real_config())
    batch = plan.auto_batch_size(shape, 128)
    fits = lambda b: sum(plan.generation_plan(shape, b, 128).values()) <= plan.T4_BUDGET_GIB * plan.GIB  # noqa: E731
    assert fits(batch) and not fits(batch + 1)
    assert plan.auto_batch_size(shape, 128, bits=4) > batch  # 4-bit weights leave room for more


# ------------------------------------------------------------------------------------------ disk: scratch and recipes


def test_kaggle_run_folder_fits_kaggles_output_and_would_not_without_scratch():
    params = load_params("kaggle_t4")
    shape = plan.shape_of(plan.real_config())
    kept = forecast.disk_table(params, shape)
    assert params.runtime.scratch_dir and kept["run folder cumulative GiB"].iloc[-1] <= plan.KAGGLE_OUTPUT_GIB
    assert kept["scratch GiB"].max() < 50  # a stage's models, pruned copies one at a time: not the ~150 GB of every copy
    everything = forecast.disk_table(load_params("kaggle_t4", {"runtime": {"scratch_dir": None}}), shape)
    assert everything["run folder cumulative GiB"].iloc[-1] > 140  # what full copies in the run folder would need


def test_the_forecast_is_on_the_index_before_the_first_stage_runs(tmp_path, monkeypatch, synthetic_root):
    import nbformat

    from medcomp import runner

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), str(notebooks / "01_first.ipynb"))
    seen = {}

    def fake_execute(notebook, run_dir, params_path):
        seen["index"] = (run_dir / "index.html").read_text()
        return runner.StageOutcome(notebook.stem, "ok", 0.0, None)

    monkeypatch.setattr(runner, "execute_stage", fake_execute)
    params = tmp_path / "kaggle.yaml"  # the preset with its dataset attached (a run without one stops before any stage)
    params.write_text(f"base: kaggle_t4\ndata:\n  root: {synthetic_root}\n")
    runner.run_pipeline(params, run_dir=tmp_path / "run", notebooks_dir=notebooks)
    assert "Forecast for 2 Kaggle T4s" in seen["index"] and "13.16" in seen["index"]  # the fp16 7B's weights, GiB
    assert "15 / 17" in seen["index"]  # blocks per GPU of the fp16 model
    assert "run folder within 19.5 GiB" in seen["index"]


def test_released_pruned_and_merged_folders_are_rebuilt_as_the_same_checkpoint(tiny_embedded_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    from medcomp.params import FinetuneParams
    from medcomp.pruning import prune_and_save
    from medcomp.runs import Run, Variant
    from medcomp.stages import materialise
    from medcomp.training import merge_adapter

    run = Run(tmp_path / "run", scratch=tmp_path / "scratch")
    run.register_variant(Variant(name="base", stage="01", path=str(tiny_embedded_model)))
    pruned_dir = run.model_dir("03", "pruned-1")
    assert str(pruned_dir).startswith(str(tmp_path / "scratch"))
    prune_and_save(str(tiny_embedded_model), [1], pruned_dir)
    run.register_variant(Variant(name="pruned-1", stage="03", path=str(pruned_dir), parent="base", layers_removed=(1,),
                                 extra={"rebuild": materialise.prune_recipe("base", [1], "float32")}))
    settings = FinetuneParams(quantization="none", compute_dtype="float32")
    torch.manual_seed(0)
    lora = get_peft_model(loading.load_llava(str(pruned_dir)), LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False))
    adapter = loading.save_with_processor(lora, loading.load_processor(str(pruned_dir)), run.stage_dir("04") / "adapter")
    merged_dir = merge_adapter(str(pruned_dir), adapter, run.model_dir("04", "merged"), "float32")
    run.register_variant(Variant(name="recovered-1", stage="04", path=str(merged_dir), parent="pruned-1", layers_removed=(1,),
                                 extra={"adapter": str(adapter), "rebuild": materialise.merge_recipe("pruned-1", str(pruned_dir), "float32", settings)}))
    identity = {name: loading.checkpoint_identity(run.variant(name).path) for name in ("pruned-1", "recovered-1")}
    weights = loading.load_llava(str(merged_dir)).state_dict()

    listed = materialise.release(run, dry_run=True)
    assert [name for name, _, _ in listed] == ["pruned-1", "recovered-1"] and all(size > 0 for _, _, size in listed)
    assert Path(merged_dir).is_dir()  # a dry run deletes nothing
    assert materialise.release(run) == listed  # `medcomp tidy`, or a new session whose scratch folder is gone
    assert not Path(merged_dir).exists() and not pruned_dir.exists() and not list(tmp_path.glob("scratch/**/.released-*"))
    assert (Path(tiny_embedded_model) / "config.json").exists() and Path(adapter).is_dir()  # no recipe, or a recipe's input: kept
    rebuilt = materialise.ensure(run, "recovered-1")  # needs pruned-1 first: rebuilt too
    assert {name: loading.checkpoint_identity(run.variant(name).path) for name in identity} == identity
    for key, value in loading.load_llava(rebuilt.path).state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    for weights_file in Path(rebuilt.path).glob("*.safetensors"):  # the folder's small files kept, its weights gone
        weights_file.unlink()
    assert loading.checkpoint_identity(materialise.ensure(run, "recovered-1").path) == identity["recovered-1"]
    run.register_variant(Variant(name="lost", stage="05", path=str(tmp_path / "nowhere"), parent="base"))
    with pytest.raises(FileNotFoundError, match="rerun 05"):
        materialise.ensure(run, "lost")


def test_registry_paths_survive_a_moved_run_folder(tmp_path):
    import shutil

    from medcomp.runs import Run, Variant

    run = Run(tmp_path / "a")
    (run.stage_dir("01") / "merged").mkdir()
    (run.stage_dir("01") / "adapter").mkdir()
    run.register_variant(Variant(name="finetuned", stage="01", path=str(run.stage_dir("01") / "merged"),
                                 extra={"adapter": str(run.stage_dir("01") / "adapter"), "sft_base": "llava-hf/llava-1.5-7b-hf"}))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    moved = Run(tmp_path / "b").variant("finetuned")
    assert moved.path == str(tmp_path / "b" / "stages" / "01" / "merged")
    assert moved.extra["adapter"] == str(tmp_path / "b" / "stages" / "01" / "adapter")
    assert moved.extra["sft_base"] == "llava-hf/llava-1.5-7b-hf"  # a hub id stays one
