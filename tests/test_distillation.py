"""Distillation recovery (medcomp.distillation, issue 32): the cached teacher outputs are the teacher's, the loss
reduces to 04's where it should, and training runs through 04's loop."""

from __future__ import annotations

import pytest
import torch

from medcomp import distillation
from medcomp.encoding import LeftPadCollator, VQATrainingSet, answer_loss
from medcomp.loading import load_llava, load_processor


@pytest.fixture(scope="module")
def examples(synthetic_root):
    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG

    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    return build_conversations([image for image in scan.images if image.split == "train"])[:6]


def _batch(processor, examples, indices):
    rows = VQATrainingSet(processor, examples, with_index=True)
    return LeftPadCollator(processor.tokenizer.pad_token_id)([rows[i] for i in indices])


def test_cached_teacher_targets_equal_a_fresh_teacher_forward_and_survive_a_reload(tiny_embedded_model, examples, tmp_path):
    teacher, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    cached = distillation.teacher_targets(teacher, processor, examples, top_k=8, batch_size=4, identity="t")  # padded batches of 4
    cached.save(tmp_path / "targets.pt")
    reloaded = distillation.TeacherTargets.load(tmp_path / "targets.pt")
    for index in (0, 5):  # each alone, unpadded: the same top-k, the same values
        with torch.no_grad():
            logits, labels, _ = distillation._answer_logits(teacher, _batch(processor, examples, [index]))
        fresh = logits.topk(8, dim=-1)
        assert reloaded.logits[index].shape == (labels.numel(), 8)
        assert torch.equal(fresh.indices, reloaded.indices[index])
        torch.testing.assert_close(fresh.values, reloaded.logits[index], rtol=1e-5, atol=1e-5)
    assert 0 < reloaded.mass <= 1 and reloaded.identity == "t"


def test_the_loss_is_04s_at_alpha_0_zero_for_the_teacher_itself_and_positive_for_another_model(tiny_embedded_model, examples):
    teacher, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    vocabulary = teacher.lm_head.out_features
    full = distillation.teacher_targets(teacher, processor, examples, top_k=vocabulary, batch_size=3)  # every token: KL is exact
    batch = _batch(processor, examples, [1, 3, 4])
    with torch.no_grad():
        sft = answer_loss(teacher, {k: v for k, v in batch.items() if k != "example_index"})
        assert float(distillation.distillation_loss(teacher, batch, full, 2.0, alpha=0.0)) == pytest.approx(float(sft), rel=1e-6)
        assert abs(float(distillation.distillation_loss(teacher, batch, full, 2.0, alpha=1.0))) < 1e-4
        student = load_llava(str(tiny_embedded_model))
        student.lm_head.weight.add_(0.05 * torch.randn_like(student.lm_head.weight))
        assert float(distillation.distillation_loss(student, batch, full, 2.0, alpha=1.0)) > 1e-3
    other = distillation.TeacherTargets({i: full.logits[i] for i in (0, 1)}, {i: full.indices[i] for i in (0, 1)}, full.mass, "other data")
    with pytest.raises(ValueError, match=r"lack training examples \[3, 4\]"):
        distillation.distillation_loss(teacher, batch, other, 2.0, 1.0)


def test_a_recovery_distils_through_04s_loop_on_targets_for_exactly_the_examples_it_draws(tiny_embedded_model, synthetic_root, tmp_path,
                                                                                         monkeypatch):
    """The teacher pass covers only ``visited_indices`` (2 steps of 3 of the 18 sequences); the Trainer's own draws
    are recorded and must be exactly those, in order: a sampler that drew others would fail here, not on a T4."""
    from medcomp import training
    from medcomp.data import build_conversations, scan_dermnet
    from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG
    from medcomp.params import FinetuneParams, LoraParams

    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    examples = build_conversations([image for image in scan.images if image.split == "train"])[:18]

    params = FinetuneParams(quantization="none", compute_dtype="float32", lora=LoraParams(r=4, alpha=8, dropout=0.0), multi_turn=False,
                            max_steps=2, batch_size=3, learning_rate=1e-2, logging_steps=1, save_steps=50)
    teacher, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    sequences = training.training_examples(examples, params)
    drawn = training.visited_indices(len(sequences), params, seed=7)
    assert len(drawn) == 6 and len(set(drawn)) == 6 and len(sequences) == 18
    assert drawn != training.visited_indices(len(sequences), params, seed=8)
    targets = distillation.teacher_targets(teacher, processor, sequences, top_k=16, batch_size=3, identity="tiny", only=drawn)
    assert sorted(targets.logits) == sorted(drawn)
    seen = []
    real_loss = training.distillation_loss
    monkeypatch.setattr(training, "distillation_loss", lambda model, batch, *args: seen.extend(batch["example_index"].tolist()) or real_loss(model, batch, *args))
    result = training.finetune(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / "kd", seed=7,
                               distillation=distillation.Distillation(targets, 2.0, 1.0))
    assert seen == drawn
    assert result.steps == 2 and (result.adapter_dir / "adapter_config.json").exists()
    assert all(entry["loss"] >= 0 for entry in result.log_history if "loss" in entry)
