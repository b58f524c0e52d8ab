"""Every criterion finds a planted identity block; the sweep resumes; rankings are data 03 can read."""

import copy

import pytest
import torch

from medcomp import importance
from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DISEASES
from medcomp.loading import decoder_layers, load_llava, load_processor
from medcomp.pruning import _renumber

ALL = [d.slug for d in DISEASES]
PLANTED = 2


@pytest.fixture(scope="module")
def calibration(synthetic_root):
    return build_conversations(select_split(scan_dermnet(synthetic_root, ALL).images, "train", per_disease=1))[:6]


@pytest.fixture(scope="module")
def model_with_identity_block(tiny_embedded_model, calibration):
    """The tiny model taught the calibration answers (so every real block matters), then given an
    extra block at index 2 whose output equals its input (its output projections are zero)."""
    from medcomp.encoding import LeftPadCollator, answer_loss, encode_for_training

    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    batch = LeftPadCollator(processor.tokenizer.pad_token_id)([encode_for_training(processor, e) for e in calibration])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        answer_loss(model, batch).backward()
        optimizer.step()
    model.eval()
    layers = decoder_layers(model)
    identity = copy.deepcopy(layers[PLANTED - 1])
    with torch.no_grad():
        identity.self_attn.o_proj.weight.zero_()
        identity.mlp.down_proj.weight.zero_()
    layers.insert(PLANTED, identity)
    _renumber(model)
    return model, processor


def test_every_criterion_ranks_the_identity_block_least_important(model_with_identity_block, calibration, tmp_path):
    from sentence_transformers import SentenceTransformer

    from medcomp.loading import sentence_model_source

    model, processor = model_with_identity_block
    layers = list(range(len(decoder_layers(model))))
    sentence = SentenceTransformer(sentence_model_source("packaged"), device="cpu")
    sweep = importance.similarity_sweep(model, processor, calibration, sentence, layers, 8, 6, tmp_path / "cache.json")
    assert sweep.loc[PLANTED, "similarity"] == pytest.approx(1.0, abs=1e-5)
    orders = {
        "similarity": importance.ranking(sweep["similarity"], higher_is_less_important=True),
        "magnitude": importance.ranking(importance.magnitude_scores(model, layers), higher_is_less_important=False),
        "block_influence": importance.ranking(importance.block_influence(model, processor, calibration, layers), higher_is_less_important=False),
        "perplexity": importance.ranking(importance.perplexity_sweep(model, processor, calibration, layers), higher_is_less_important=False),
    }
    for name, order in orders.items():
        assert order[0] == PLANTED, f"{name} ranked {order}"
    assert importance.block_influence(model, processor, calibration, [PLANTED])[PLANTED] == pytest.approx(0.0, abs=1e-6)


def test_perplexity_sweep_equals_running_each_pruned_model_whole(model_with_identity_block, calibration):
    """Skipping the blocks before the removed one (their output is replayed) must not change a bit:
    the reference is the pruned model run whole (``without_layers``), batch by batch as the sweep
    accumulates. Fails if the replayed input, the blocks after it or the accumulation differ."""
    import numpy as np

    from medcomp.encoding import teacher_forced_batches
    from medcomp.pruning import without_layers

    model, processor = model_with_identity_block
    layers = list(range(len(decoder_layers(model))))
    batches = teacher_forced_batches(processor, calibration, 4)  # 2 batches: 4 + 2 conversations
    assert len(batches) == 2
    before = [id(layer) for layer in decoder_layers(model)]
    swept = importance.perplexity_sweep(model, processor, calibration, layers, batches=batches, progress=False)
    for layer in layers:
        with without_layers(model, [layer]):
            whole = importance.reference_perplexity(model, processor, calibration, batches=batches)
        assert swept[layer] == whole, f"block {layer}: {swept[layer]!r} != {whole!r}"
    assert len(set(swept.round(6))) == len(layers)  # every removal changes the perplexity: no layer was skipped twice
    assert [id(layer) for layer in decoder_layers(model)] == before  # the model is restored
    assert [getattr(l.self_attn, "layer_idx") for l in decoder_layers(model)] == layers
    assert np.isfinite(swept).all()


def test_an_interrupted_sweep_resumes_without_recomputing(model_with_identity_block, calibration, tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from medcomp.loading import sentence_model_source

    model, processor = model_with_identity_block
    sentence = SentenceTransformer(sentence_model_source("packaged"), device="cpu")
    reference = importance.answer_texts(model, processor, calibration, 6, 6)
    cache = tmp_path / "sweep.json"
    first = importance.similarity_sweep(model, processor, calibration, sentence, [0, 1], 6, 6, cache, reference=reference)
    calls = []
    real = importance.generate_answers
    monkeypatch.setattr(importance, "generate_answers", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = importance.similarity_sweep(model, processor, calibration, sentence, [0, 1, 3], 6, 6, cache, reference=reference)
    assert len(calls) == 1, "only the new layer is generated"
    assert resumed.loc[[0, 1], "similarity"].tolist() == first["similarity"].tolist()
    calls.clear()
    importance.similarity_sweep(model, processor, calibration, sentence, [0], 7, 6, cache, reference=reference)
    assert len(calls) == 1, "another answer length is another setup: nothing is reused"


def test_rankings_round_trip_and_correlate(tmp_path):
    import pandas as pd

    scores = {"a": pd.Series({2: 0.9, 3: 0.1, 4: 0.5}), "b": pd.Series({2: 1.0, 3: 3.0, 4: 2.0})}
    orders = {"a": importance.ranking(scores["a"], True), "b": importance.ranking(scores["b"], False)}
    assert orders == {"a": [2, 4, 3], "b": [2, 4, 3]}
    correlations = importance.rank_correlations(orders, [2, 3, 4])
    assert correlations.loc["a", "b"] == pytest.approx(1.0)
    table = importance.rankings_table(scores, orders)
    importance.save_rankings(tmp_path, orders, table, {"num_layers": 6})
    assert importance.load_rankings(tmp_path)["orders"] == orders
    with pytest.raises(FileNotFoundError, match="run 02_layer_importance first"):
        importance.load_rankings(tmp_path / "missing")
    with pytest.raises(ValueError, match="exceeds"):
        importance.sample_calibration([], 3, 0)


def test_iterative_removal_equals_a_brute_force_re_rank_on_a_4_block_model(tiny_embedded_model, synthetic_root):
    """SLEB's loop against the plainest computation: at every round, each remaining block removed from the model
    pruned so far and the whole model run again (no replay), the lowest perplexity removed."""
    from medcomp import importance
    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG
    from medcomp.loading import load_llava, load_processor
    from medcomp.pruning import without_layers

    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    calibration = build_conversations([image for image in scan.images if image.split == "train"])[:5]
    removed, rounds = importance.iterative_removal(model, processor, calibration, [0, 1, 2, 3], 3, batch_size=2, progress=False)
    expected: list[int] = []
    for round_scores in rounds:
        brute = {}
        for block in [b for b in range(4) if b not in expected]:
            with without_layers(model, [*expected, block]):
                brute[block] = importance.reference_perplexity(model, processor, calibration, batch_size=2)
        assert sorted(round_scores.index) == sorted(brute)
        for block, value in brute.items():
            assert round_scores[block] == pytest.approx(value, rel=1e-5)
        expected.append(min(brute, key=lambda b: (brute[b], b)))
    assert removed == expected and len(set(removed)) == 3
    assert len(importance.decoder_layers(model)) == 4  # the model is whole again
