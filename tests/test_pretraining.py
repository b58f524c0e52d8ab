"""The embedded model's pretraining: honest captions, disjoint images, the right features trained."""

import json

import pytest
import torch

from medcomp.evaluation import named_disease
from medcomp.knowledge import DISEASES
from medcomp.loading import load_llava, load_processor
from medcomp.params import load_params
from medcomp.pretraining import assert_disjoint, pretrain_vision_tower, read_captioned_images, stage1_examples
from medcomp.synthetic import CAPTIONS, generate_captioned_images


def test_captions_never_name_a_disease():
    assert set(CAPTIONS) == {d.slug for d in DISEASES} and all(len(c) == 3 for c in CAPTIONS.values())
    for caption in (c for captions in CAPTIONS.values() for c in captions):
        assert named_disease(caption) is None, caption
        assert not any(word in caption.lower() for d in DISEASES for word in d.name.split() if len(word) > 5), caption


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    return generate_captioned_images(tmp_path_factory.mktemp("pre") / "set", per_disease=3, image_size=32, seed=1000)


def test_pretraining_set_is_seeded_captioned_and_disjoint(captioned, synthetic_root, tmp_path):
    images = read_captioned_images(captioned)
    assert len(images) == 24 and all(image.caption in CAPTIONS[image.group] for image in images)
    again = generate_captioned_images(tmp_path / "again", per_disease=3, image_size=32, seed=1000)
    assert (captioned / "captions.jsonl").read_text() == (again / "captions.jsonl").read_text()
    dataset = [str(p) for p in synthetic_root.rglob("*.jpg")]
    assert_disjoint([image.path for image in images], dataset)
    with pytest.raises(ValueError, match="identical to train/test images"):
        assert_disjoint([image.path for image in images], dataset + [images[0].path])


def test_vision_pretraining_learns_on_the_features_llava_reads(tiny_embedded_model, captioned):
    from sentence_transformers import SentenceTransformer

    from medcomp.loading import sentence_model_source

    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sentence = SentenceTransformer(sentence_model_source("packaged"), device="cpu")
    result = pretrain_vision_tower(model, processor, read_captioned_images(captioned), sentence, steps=30, batch_size=16, learning_rate=3e-3)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # vision_feature_layer=-2 of a 2-layer tower: embeddings and layer 0 learn; layer 1 and post_layernorm are never read.
    assert any("vision_tower.encoder.layers.0." in name for name in changed)
    assert not any(".encoder.layers.1." in name or "post_layernorm" in name for name in changed)
    assert all(name.startswith("model.vision_tower.") for name in changed), "only the tower is pretrained"


def test_stage1_trains_only_the_projector(tiny_embedded_model, captioned, tmp_path):
    from medcomp.training import train_modules_only

    params = load_params("embedded", {"finetune": {"fully_trained_modules": ["multi_modal_projector"], "max_steps": 2, "batch_size": 4}}).finetune
    examples = stage1_examples(read_captioned_images(captioned))
    assert all(e.question == "Describe the lesion." and named_disease(e.reference) is None for e in examples)
    result = train_modules_only(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / "stage1", target_dir=tmp_path / "out")
    assert result.steps == 2 and result.adapter_dir is None and result.merged_dir == tmp_path / "out"
    start, aligned = load_llava(str(tiny_embedded_model)), load_llava(str(result.merged_dir))
    changed = {name for name, p in aligned.state_dict().items() if not torch.equal(p, start.state_dict()[name])}
    assert changed and all(".multi_modal_projector." in f".{name}" for name in changed)
    # Loaded unquantized although the params say nf4: the frozen part comes back bit for bit.
    assert params.quantization == "nf4"


def test_build_caches_each_step_and_records_what_it_did(tmp_path, tiny_embedded_model, captioned, synthetic_root):
    from medcomp.pretraining import build_pretrained_embedded_llava, pretraining_report

    settings = {"vision_steps": 3, "vision_batch_size": 8, "vision_learning_rate": 1e-3,
                "stage1_steps": 1, "stage1_batch_size": 2, "stage1_learning_rate": 1e-3}
    out = build_pretrained_embedded_llava(tiny_embedded_model, tmp_path / "m", captioned, [str(p) for p in synthetic_root.rglob("*.jpg")], settings)
    report = pretraining_report(out)
    distinct = len({image.caption for image in read_captioned_images(captioned)})
    assert report["vision pretraining steps"] == 3 and report["stage 1 steps"] == 1 and report["distinct captions"] == distinct
    assert json.loads((tmp_path / "m.vision" / "vision_pretraining.json").read_text())["heldout_images"] >= 1
    assert not (tmp_path / "m.stage1-work").exists(), "checkpoints of a finished build are cleaned up"
