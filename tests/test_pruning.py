"""Removing decoder blocks: exact against an independently built shallower model, cache-safe, saved and reloaded."""

import pytest
import torch

from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DISEASES
from medcomp.loading import decoder_layers, load_llava, load_processor
from medcomp.pruning import (drop_layers, first_of_ranking, levels_for_depth, prunable_layers, prune_and_save, without_layer_given_input,
                             without_layers)

ALL = [d.slug for d in DISEASES]
MODELS = ["tiny_embedded_model", "tiny_qwen2_llava"]


def _inputs(model_dir, root, n=2):
    processor = load_processor(str(model_dir))
    examples = build_conversations(select_split(scan_dermnet(root, ALL).images, "test", total=n))[:n]
    texts = [processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True) for e in examples]
    from medcomp.data import load_rgb

    return processor(text=texts, images=[load_rgb(e.image) for e in examples], return_tensors="pt", padding=True)


def _shallower_copy(model, removed):
    """The independent reference: a fresh LLaVA built with fewer layers, loaded with the kept blocks' weights."""
    import copy

    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(model.config)
    kept = [i for i in range(config.text_config.num_hidden_layers) if i not in removed]
    config.text_config.num_hidden_layers = len(kept)
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = [config.text_config.layer_types[i] for i in kept]
    reference = LlavaForConditionalGeneration(config).eval()
    state = {}
    prefix = "model.language_model.layers."
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in removed:
                continue
            key = f"{prefix}{kept.index(int(index))}.{rest}"
        state[key] = value
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("fixture", MODELS)
def test_removal_equals_a_model_built_without_those_layers(fixture, request, synthetic_root):
    model_dir = request.getfixturevalue(fixture)
    model = load_llava(str(model_dir))
    inputs = _inputs(model_dir, synthetic_root)
    reference = _shallower_copy(model, {1, 2})
    with torch.no_grad():
        full = model(**inputs).logits
        drop_layers(model, [1, 2])
        pruned = model(**inputs).logits
        expected = reference(**inputs).logits
    torch.testing.assert_close(pruned, expected)
    assert not torch.allclose(pruned, full)
    assert model.config.text_config.num_hidden_layers == 2 == len(decoder_layers(model))
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]


@pytest.mark.parametrize("fixture", MODELS)
def test_cached_and_uncached_generation_agree_after_removal(fixture, request, synthetic_root):
    model_dir = request.getfixturevalue(fixture)
    model = load_llava(str(model_dir))
    inputs = _inputs(model_dir, synthetic_root)
    drop_layers(model, [0, 2])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("fixture", MODELS)
def test_save_and_reload_keep_layers_and_answers(fixture, request, synthetic_root, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    target = prune_and_save(str(model_dir), [1], tmp_path / "pruned")
    inputs = _inputs(model_dir, synthetic_root)
    in_memory = drop_layers(load_llava(str(model_dir)), [1])
    reloaded = load_llava(str(target))
    assert len(decoder_layers(reloaded)) == 3 and reloaded.config.text_config.num_hidden_layers == 3
    layer_types = getattr(reloaded.config.text_config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 3
    with torch.no_grad():
        assert torch.equal(in_memory.generate(**inputs, max_new_tokens=6, do_sample=False),
                           reloaded.generate(**inputs, max_new_tokens=6, do_sample=False))


def test_without_layers_restores_the_model_exactly(tiny_qwen2_llava, synthetic_root):
    model = load_llava(str(tiny_qwen2_llava))
    inputs = _inputs(tiny_qwen2_llava, synthetic_root)
    types = list(model.config.text_config.layer_types)
    with torch.no_grad():
        before = model(**inputs).logits
        with without_layers(model, [3]):
            assert len(decoder_layers(model)) == 3
        after = model(**inputs).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert model.config.text_config.layer_types == types and [l.self_attn.layer_idx for l in decoder_layers(model)] == [0, 1, 2, 3]


@pytest.mark.parametrize("fixture", MODELS)
def test_replaying_a_blocks_input_equals_removing_it(fixture, request, synthetic_root):
    """``without_layer_given_input`` (the blocks before the removed one replaced by its recorded input)
    gives the bits of ``without_layers`` for every block, on Llama and on Qwen2 (whose config lists a
    type per layer), and leaves the model as it found it."""
    from medcomp.importance import layer_inputs

    model_dir = request.getfixturevalue(fixture)
    model = load_llava(str(model_dir))
    inputs = dict(_inputs(model_dir, synthetic_root))
    config = model.config.text_config
    types = list(config.layer_types) if getattr(config, "layer_types", None) is not None else None
    layers = list(range(len(decoder_layers(model))))
    with torch.no_grad():
        recorded = layer_inputs(model, inputs, layers)
        for layer in layers:
            with without_layers(model, [layer]):
                whole = model.model(**inputs, use_cache=False).last_hidden_state
            with without_layer_given_input(model, layer, recorded[layer]):
                replayed = model.model(**inputs, use_cache=False).last_hidden_state
            assert torch.equal(whole, replayed), f"block {layer}"
    assert [l.self_attn.layer_idx for l in decoder_layers(model)] == layers and config.num_hidden_layers == len(layers)
    assert (list(config.layer_types) if types is not None else None) == types


def test_levels_map_onto_any_depth_without_duplicates():
    paper = [0, 2 / 32, 4 / 32, 7 / 32, 8 / 32, 9 / 32, 10 / 32]
    counts = lambda levels: [count for _, count in levels]  # noqa: E731
    assert counts(levels_for_depth(paper, 32, 29)) == [0, 2, 4, 7, 8, 9, 10]
    assert counts(levels_for_depth(paper, 30, 27)) == [0, 2, 4, 7, 8, 9, 10]
    shallow = counts(levels_for_depth(paper, 8, 5))
    assert shallow == sorted(set(shallow)) and shallow[0] == 0
    with pytest.warns(UserWarning, match="left out"):
        assert counts(levels_for_depth(paper, 4, 1)) == [0, 1]
    assert prunable_layers(32) == list(range(2, 31))
    assert first_of_ranking([9, 3, 5, 4], 3) == [3, 5, 9]
    with pytest.raises(ValueError):
        prunable_layers(3, 2, 1)
    with pytest.raises(IndexError):
        drop_layers(_stub_with_three_layers(), [7])


def _stub_with_three_layers():
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.language_model = torch.nn.Module()
            self.model.language_model.layers = torch.nn.ModuleList([torch.nn.Linear(1, 1) for _ in range(3)])

    return Stub()


def test_plan_names_levels_and_adds_the_magnitude_baseline():
    from medcomp.stages.prune import pruning_plan

    orders = {"similarity": [5, 3, 4, 2], "magnitude": [2, 4, 3, 5]}
    plan = pruning_plan(orders, "similarity", [(0.0, 0), (0.25, 2)], magnitude_fraction=0.25)
    assert [(s.name, s.ranking, s.layers) for s in plan] == [
        ("finetuned", "similarity", ()), ("pruned-2", "similarity", (3, 5)), ("pruned-2-magnitude", "magnitude", (2, 4))]


def test_a_pruned_model_knows_which_checkpoint_it_came_from(tiny_embedded_model, tmp_path):
    import shutil

    from medcomp.pruning import pruned_from

    source = tmp_path / "source"
    shutil.copytree(tiny_embedded_model, source)
    target = prune_and_save(str(source), [1], tmp_path / "pruned")
    assert pruned_from(target, source, [1]) and not pruned_from(target, source, [2])
    (source / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())  # the parent is rewritten
    assert not pruned_from(target, source, [1]), "a rebuilt parent must never serve stale pruned models"
