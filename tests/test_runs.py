import json

import pytest

from medcomp.params import load_params
from medcomp.notebook import start_stage
from medcomp.runs import Run, Variant, write_manifest


def test_registry_round_trip(tmp_path):
    run = Run(tmp_path)
    run.register_variant(Variant(name="finetuned", stage="01_finetune", path="m", parameters=10))
    run.register_variant(Variant(name="pruned-2", stage="03_prune", path="p", parent="finetuned", layers_removed=(5, 9), bits=16))
    assert run.variant("pruned-2").layers_removed == (5, 9)
    with pytest.raises(KeyError, match="parent"):
        run.register_variant(Variant(name="x", stage="s", path="p", parent="missing"))
    with pytest.raises(KeyError, match="register"):
        run.save_answers("unknown", [])
    run.save_answers("finetuned", [{"image": "a.jpg", "question": "q", "reference": "r", "answer": "a"}])
    assert Run(tmp_path).answers("finetuned")[0]["variant"] == "finetuned"


def test_manifest_records_params_commit_packages_hardware(tmp_path):
    params = load_params("embedded")
    manifest = json.loads(write_manifest(tmp_path, params).read_text())
    assert manifest["params"]["run_name"] == "embedded"
    from importlib.metadata import version

    assert manifest["packages"]["transformers"] == version("transformers") and manifest["packages"]["torch"] == version("torch")
    assert manifest["hardware"]["cpu_count"] >= 1 and "commit" in manifest["git"]


def test_start_stage_seeds_and_opens_the_run(tmp_path):
    import torch

    params, run = start_stage("embedded", tmp_path / "r")
    first = torch.rand(3)
    start_stage("embedded", tmp_path / "r")
    assert torch.equal(first, torch.rand(3))
    assert (run.directory / "manifest.json").exists() and params.world == "embedded"


def test_packaged_sentence_model_embeds_offline(monkeypatch):
    """The layer ranking of 02 uses all-MiniLM-L6-v2; the embedded world loads it from its wheel."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from medcomp.loading import sentence_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(sentence_model_source("packaged"), device="cpu")
    melanoma, again, psoriasis = model.encode(["This is melanoma.", "This is melanoma.", "Psoriasis is treated with steroids."], normalize_embeddings=True)
    assert melanoma.shape == (384,)
    assert np.dot(melanoma, again) > 0.999 and np.dot(melanoma, psoriasis) < 0.9
    assert sentence_model_source("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_registry_paths_survive_moving_the_run(tmp_path):
    run = Run(tmp_path / "run")
    model_dir = run.stage_dir("01_finetune") / "merged"
    model_dir.mkdir()
    run.register_variant(Variant(name="finetuned", stage="01_finetune", path=str(model_dir)))
    run.register_variant(Variant(name="hub", stage="01_finetune", path="llava-hf/llava-1.5-7b-hf"))
    assert json.loads(run.registry_path.read_text())["variants"]["finetuned"]["path"] == "./stages/01_finetune/merged"  # run-relative

    moved = Run((tmp_path / "run").rename(tmp_path / "moved"))
    assert moved.variant("finetuned").path == str(tmp_path / "moved" / "stages" / "01_finetune" / "merged")
    assert moved.variant("hub").path == "llava-hf/llava-1.5-7b-hf"


def test_numerics_probe_is_deterministic_and_pins_reach_a_fresh_process():
    from medcomp import numerics

    assert numerics.probe() == numerics.probe()
    pinned = numerics.kernel_fingerprint("pinned")
    assert pinned["pins"] == numerics.PINNED_ENV and pinned["aten capability"] in ("AVX2", "DEFAULT")
    assert len(pinned["probe hash"]) == 16 and pinned["torch threads"] >= 1
    assert numerics.pinned_environment("default") == {}


def test_artefact_hashes_name_each_stage_that_wrote_its_artefact(tmp_path):
    from medcomp import numerics

    rankings = tmp_path / "stages" / "02_layer_importance" / "rankings.json"
    rankings.parent.mkdir(parents=True)
    rankings.write_text('{"orders": {}}')
    hashes = numerics.artefact_hashes(tmp_path)
    assert hashes == {"02_layer_importance": numerics.sha256_prefix(rankings)} and len(hashes["02_layer_importance"]) == 16
    rankings.write_text('{"orders": {"x": [1]}}')
    assert numerics.artefact_hashes(tmp_path)["02_layer_importance"] != hashes["02_layer_importance"]
