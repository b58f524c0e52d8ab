"""Block replacement (LLM-Streamline): the span choice finds planted identity blocks, a replacement trained on an
identity block learns the identity, and the saved model is the pruned parent with the trained block in place."""

import copy

import pytest
import torch

from medcomp import replacement
from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.encoding import teacher_forced_batches
from medcomp.knowledge import DISEASES
from medcomp.loading import checkpoint_identity, decoder_layers, load_llava, load_processor
from medcomp.pruning import _renumber


@pytest.fixture(scope="module")
def examples(synthetic_root):
    return build_conversations(select_split(scan_dermnet(synthetic_root, [d.slug for d in DISEASES]).images, "train", per_disease=1))[:8]


def _identity_copy(block):
    identity = copy.deepcopy(block)
    with torch.no_grad():  # the residual stream passes through unchanged: both output projections are zero
        identity.self_attn.o_proj.weight.zero_()
        identity.mlp.down_proj.weight.zero_()
    return identity


@pytest.fixture(scope="module")
def model_with_identity_run(tiny_embedded_model):
    """The tiny 4-block model with two identity blocks planted at 2 and 3 (6 blocks)."""
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    layers = decoder_layers(model)
    for position in (2, 3):
        layers.insert(position, _identity_copy(layers[1]))
    _renumber(model)
    return model, processor


def test_the_most_similar_span_is_the_planted_identity_run(model_with_identity_run, examples):
    model, processor = model_with_identity_run
    batches = teacher_forced_batches(processor, examples, 4)
    similarities = replacement.span_similarities(model, batches, 2, range(1, 5))
    assert sorted(similarities) == [1, 2, 3]  # runs of 2 inside blocks 1-4
    assert similarities[2] == pytest.approx(1.0, abs=1e-6) and max(similarities[1], similarities[3]) < 0.999
    assert replacement.choose_span(similarities) == 2
    with pytest.raises(ValueError, match="no run of 5 contiguous blocks"):
        replacement.span_similarities(model, batches, 5, range(1, 5))


def test_a_replacement_trained_on_an_identity_block_learns_the_identity(model_with_identity_run, examples):
    """The run is block 2 alone (an identity); the only block offered to start from is a real one (block 1's copy),
    so the replacement starts far from the identity and must learn it; it is checked on a batch it never saw."""
    model, processor = model_with_identity_run
    batches = teacher_forced_batches(processor, examples, 2)
    recorded = replacement.record_run(model, batches[:3], 2, 3)
    torch.testing.assert_close(recorded.outputs[0], recorded.inputs[0])  # the planted block is an identity
    offered = list(decoder_layers(model))
    offered[2] = copy.deepcopy(offered[1])
    trained = replacement.train_replacement(offered, recorded, steps=300, learning_rate=3e-3, progress=False)
    assert trained.initialised_from == 2 and trained.error_before > 1e-2
    assert trained.error_after < 2e-3 and trained.losses[-1] < trained.losses[0] / 100
    unseen = replacement.record_run(model, batches[3:], 2, 3)
    # measured: 40 % relative error per token at the start, 0.006 % after on the batches trained on, 1.1 % on the unseen one
    assert replacement.relative_error(trained.block, unseen, "cpu") < 0.02


def test_the_saved_model_is_the_parent_without_the_run_and_the_trained_block_in_its_place(tiny_embedded_model, examples, tmp_path):
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    batches = teacher_forced_batches(processor, examples, 4)
    recorded = replacement.record_run(model, batches, 1, 3)
    trained = replacement.train_replacement(decoder_layers(model), recorded, steps=5, learning_rate=1e-3, progress=False)
    assert trained.initialised_from in (1, 2) and trained.error_after < trained.error_before
    block_file = tmp_path / "block.safetensors"
    replacement.save_block(trained.block, block_file)
    target = replacement.replace_and_save(str(tiny_embedded_model), 1, 3, block_file, tmp_path / "replaced")
    saved = load_llava(str(target))
    assert len(decoder_layers(saved)) == 3 and saved.config.text_config.num_hidden_layers == 3
    for name, value in trained.block.state_dict().items():
        torch.testing.assert_close(decoder_layers(saved)[1].state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(decoder_layers(saved)[2].state_dict(), decoder_layers(model)[3].state_dict(), rtol=0, atol=0)
    # the saved model computes what the parent computes with its run replaced by the trained block
    with torch.no_grad():
        replaced = copy.deepcopy(model)
        layers = decoder_layers(replaced)
        layers[1] = trained.block
        del layers[2]
        _renumber(replaced)
        batch = {k: v for k, v in batches[0].items() if k not in ("labels", "answer_span")}
        torch.testing.assert_close(saved(**batch).logits, replaced(**batch).logits, rtol=1e-5, atol=1e-5)
    again = replacement.replace_and_save(str(tiny_embedded_model), 1, 3, block_file, tmp_path / "rebuilt")
    assert checkpoint_identity(again)[0] == checkpoint_identity(target)[0]  # a rebuild from the recipe is the same checkpoint


def test_a_missing_replaced_model_is_rebuilt_from_its_recipe_and_the_block_in_the_run_folder(tiny_embedded_model, tmp_path):
    """On Kaggle the pruned model lives in a scratch folder that a later session lacks: ``ensure`` rebuilds it from the
    finetuned model and the trained block, which moved with the run folder, as the same checkpoint."""
    import shutil

    from medcomp.runs import Run, Variant
    from medcomp.stages import materialise

    run = Run(tmp_path / "run", scratch=tmp_path / "scratch")
    run.register_variant(Variant(name="finetuned", stage="01", path=str(tiny_embedded_model)))
    model = load_llava(str(tiny_embedded_model))
    block_file = run.stage_dir("08") / "block.safetensors"
    replacement.save_block(replacement.detached_copy(decoder_layers(model)[2], "cpu"), block_file)
    target = replacement.replace_and_save(str(tiny_embedded_model), 1, 3, block_file, run.model_dir("08", "pruned-1-streamline"))
    run.register_variant(Variant(name="pruned-1-streamline", stage="08", path=str(target), parent="finetuned", layers_removed=(2,),
                                 extra={"rebuild": materialise.replace_recipe("finetuned", 1, 3, "float32"), "replacement_block": str(block_file)}))
    identity, weights = checkpoint_identity(target), load_llava(str(target)).state_dict()
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "scratch")
    rebuilt = materialise.ensure(Run(moved, scratch=tmp_path / "scratch"), "pruned-1-streamline")
    assert checkpoint_identity(rebuilt.path) == identity
    for key, value in load_llava(rebuilt.path).state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    assert decoder_layers(load_llava(rebuilt.path))[1].self_attn.q_proj.weight.equal(decoder_layers(model)[2].self_attn.q_proj.weight)
