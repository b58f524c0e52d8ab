"""One model over two GPUs (Kaggle's T4 x2): the device map against the real config, and a split model that
answers as the whole one does."""

from __future__ import annotations

import pytest
import torch

from medcomp import placement, plan
from medcomp.params import load_params


def test_the_real_config_split_over_two_t4s_places_every_module_within_each_gpus_cap():
    """llava-1.5-7b on the meta device: every parameter and buffer has a device in the map, the modules
    generation starts from are on GPU 0 and the logits come from the last, and each GPU's weights are
    under the T4 cap with the plan's batch; one T4 could not hold what the split holds."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = plan.real_config()
    parts = placement.parts_of(config)
    layers_per_gpu = placement.balanced_layers(*parts.part_bytes(16), parts.layers, 2)
    mapping = placement.device_map(layers_per_gpu)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(**config))
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        assert any(name == key or name.startswith(key + ".") for key in mapping), f"{name} has no device"
    assert {mapping[name] for name in placement.FIRST_GPU_MODULES} == {0} and mapping["lm_head"] == 1
    assert sum(layers_per_gpu) == 32 and layers_per_gpu in ((15, 17), (16, 16))  # balanced by bytes, the tower on GPU 0
    weights = placement.gpu_bytes(parts, layers_per_gpu)
    by_device = {0: 0, 1: 0}  # the map's own sums, from the meta model: equal to the arithmetic
    for name, parameter in model.named_parameters():
        by_device[next(device for key, device in mapping.items() if name == key or name.startswith(key + "."))] += 2 * parameter.numel()
    assert [by_device[0], by_device[1]] == pytest.approx(weights)
    assert max(weights) / plan.GIB < 7.0 and sum(weights) / plan.GIB > 13.0


def test_kaggle_t4_plans_each_of_two_gpus_within_its_cap_and_the_single_preset_one():
    shape = plan.shape_of(plan.real_config())
    two = plan.with_batch_sizes(load_params("kaggle_t4"))
    assert two.model.gpus == 2 and two.evaluation.batch_size == 16  # the split leaves room for the largest batch asked
    plans = plan.stage_plans(two, shape)
    over = [(p.stage, p.step, [round(g / plan.GIB, 2) for g in p.gpu_peaks]) for p in plans if not p.fits()]
    assert not over, over
    split = [p for p in plans if len(p.gpus) == 2]
    assert {p.stage for p in split} >= {"01_finetune", "02_layer_importance", "03_prune", "04_sft_pruned", "06_benchmark"}
    assert all(len(p.gpu_peaks) == 2 and max(p.gpu_peaks) <= plan.T4_BUDGET_GIB * plan.GIB for p in split)
    assert all(sum(p.gpus) == p.parts.layers for p in split)
    single = plan.with_batch_sizes(load_params("kaggle_t4_single"))
    assert single.model.gpus == 1 and single.evaluation.batch_size == 3  # today's one-T4 plan: 14.44 of 14.5 GiB
    assert all(p.fits() and len(p.gpu_peaks) == 1 for p in plan.stage_plans(single, shape))


@pytest.mark.parametrize("gpus", [3, 4])
def test_more_gpus_split_contiguously_and_keep_the_fullest_smallest(gpus):
    parts = placement.parts_of(plan.real_config())
    first, layer, last = parts.part_bytes(16)
    split = placement.balanced_layers(first, layer, last, parts.layers, gpus)
    assert len(split) == gpus and sum(split) == parts.layers and all(count > 0 for count in split)
    fullest = max(placement.gpu_bytes(parts, split))
    # no single block moved to a neighbour makes the fullest GPU lighter
    for gpu in range(gpus - 1):
        for move in (-1, 1):
            other = list(split)
            other[gpu] += move
            other[gpu + 1] -= move
            if min(other) >= 0:
                assert max(placement.gpu_bytes(parts, other)) >= fullest - 1


def test_asking_for_more_gpus_than_the_machine_has_says_what_to_set(tiny_llava15_standin, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="model.gpus is 2 but this machine shows 1 CUDA device.*kaggle_t4_single"):
        placement.cuda_device_map(tiny_llava15_standin, gpus=2)


def test_the_standin_split_over_two_devices_generates_the_tokens_it_does_on_one(tiny_llava15_standin, tmp_path):
    """The map the run loads with, on two devices a CPU has: blocks of the first part on "cpu", the rest on
    "disk" (accelerate offloads them and its hooks stream their weights in at each forward, as they move
    hidden states between GPUs). from_pretrained refuses a map that misses a module; generation must match
    the model loaded whole."""
    from transformers import LlavaForConditionalGeneration

    from medcomp.loading import load_processor, to_model

    mapping = placement.cuda_device_map(tiny_llava15_standin, gpus=2, devices=["cpu", "disk"])
    assert set(mapping.values()) == {"cpu", "disk"} and mapping["model.vision_tower"] == "cpu" and mapping["lm_head"] == "disk"
    whole = LlavaForConditionalGeneration.from_pretrained(tiny_llava15_standin, dtype=torch.float32).eval()
    split = LlavaForConditionalGeneration.from_pretrained(tiny_llava15_standin, dtype=torch.float32, device_map=mapping,
                                                          offload_folder=str(tmp_path / "offload")).eval()
    assert {str(device) for device in split.hf_device_map.values()} == {"cpu", "disk"}
    processor = load_processor(tiny_llava15_standin)
    from PIL import Image

    image = Image.new("RGB", (28, 28), (200, 120, 90))
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
                                           add_generation_prompt=True)
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    outputs = [model.generate(**to_model(batch, model), max_new_tokens=8, do_sample=False) for model in (whole, split)]
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].shape[1] > batch["input_ids"].shape[1]


def test_02s_perplexity_sweep_on_a_split_model_equals_the_whole_models(tiny_llava15_standin, tmp_path, synthetic_root):
    """02 replays each block's recorded input to the blocks after it; on a split model those blocks sit on the other
    device, behind accelerate's hooks. The perplexities must be the whole model's (the same device map as the run's)."""
    from transformers import LlavaForConditionalGeneration

    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.importance import perplexity_sweep
    from medcomp.knowledge import DISEASES_BY_SLUG
    from medcomp.loading import load_processor

    calibration = build_conversations(scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG)).images[:2])
    processor = load_processor(tiny_llava15_standin)
    mapping = placement.cuda_device_map(tiny_llava15_standin, gpus=2, devices=["cpu", "disk"])
    whole = LlavaForConditionalGeneration.from_pretrained(tiny_llava15_standin, dtype=torch.float32).eval()
    split = LlavaForConditionalGeneration.from_pretrained(tiny_llava15_standin, dtype=torch.float32, device_map=mapping,
                                                          offload_folder=str(tmp_path / "offload")).eval()
    layers = list(range(len(whole.model.language_model.layers)))  # blocks on both sides of the split
    assert {mapping[f"{placement.LAYERS}.{layer}"] for layer in layers} == {"cpu", "disk"}
    with torch.no_grad():
        expected, found = (perplexity_sweep(model, processor, calibration, layers, batch_size=2, progress=False) for model in (whole, split))
    assert found.to_dict() == pytest.approx(expected.to_dict(), rel=1e-5)
