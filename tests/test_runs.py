import json
from pathlib import Path

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


def test_kernel_fingerprint_is_measured_once_per_mode_and_a_failure_is_retried(monkeypatch):
    """Every run of a sweep (and of a test) measured it again in a child: ~8 s each."""
    import subprocess

    from medcomp import numerics

    monkeypatch.setattr(numerics, "_MEASURED", {})
    calls = []

    def child(command, env, **kwargs):
        calls.append(env.get("MKL_CBWR"))
        if len(calls) == 1:
            return subprocess.CompletedProcess(command, 1, "", "Traceback\nRuntimeError: torch failed to load")
        return subprocess.CompletedProcess(command, 0, json.dumps({"probe hash": f"hash-{env.get('MKL_CBWR')}"}), "")

    monkeypatch.setattr(numerics.subprocess, "run", child)
    assert numerics.kernel_fingerprint("pinned") == {"error": "RuntimeError: torch failed to load"}
    assert numerics.kernel_fingerprint("pinned") == {"probe hash": "hash-AVX2"}  # the failure was not kept
    numerics.kernel_fingerprint("pinned")["probe hash"] = "changed by a caller"
    assert numerics.kernel_fingerprint("pinned") == {"probe hash": "hash-AVX2"}
    assert numerics.kernel_fingerprint("default") == {"probe hash": "hash-None"}
    assert calls == ["AVX2", "AVX2", None]


def test_artefact_hashes_name_each_stage_that_wrote_its_artefact(tmp_path):
    from medcomp import numerics

    rankings = tmp_path / "stages" / "02_layer_importance" / "rankings.json"
    rankings.parent.mkdir(parents=True)
    rankings.write_text('{"orders": {}}')
    hashes = numerics.artefact_hashes(tmp_path)
    assert set(hashes) == {"02_layer_importance"} and len(hashes["02_layer_importance"]) == 16
    rankings.write_text('{"orders": {"x": [1]}}')
    assert numerics.artefact_hashes(tmp_path)["02_layer_importance"] != hashes["02_layer_importance"]
    adapter = tmp_path / "stages" / "01_finetune" / "adapter" / "adapter_model.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"\x00\x01")
    assert numerics.artefact_hashes(tmp_path)["01_finetune"] == numerics.sha256_prefix(adapter)  # binary: its bytes


def test_artefact_hashes_say_what_was_computed_not_where_the_run_and_cache_live(tmp_path):
    """The same answers and rankings, written by runs in two folders with two caches, hash the same;
    a different answer, or the same image in another split, does not."""
    from medcomp import numerics

    def write_run(run_dir, cache, answer="This is acne.", split="test"):
        image = f"{cache}/datasets/dermnet-synthetic-d25f3a9b2e6e/{split}/Acne and Rosacea Photos/acne-1.jpg"
        rows = [{"variant": "pruned-7", "image": image, "question": "What is the name of this disease?", "answer": answer,
                 "new_tokens": 5, "stopped": True}]
        (run_dir / "answers").mkdir(parents=True)
        (run_dir / "answers" / "pruned-7.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rankings = run_dir / "stages" / "02_layer_importance" / "rankings.json"
        rankings.parent.mkdir(parents=True)
        rankings.write_text(json.dumps({"orders": {"similarity": [14, 13]}, "model": f"{run_dir}/stages/01_finetune/merged"}, indent=2))
        return numerics.artefact_hashes(run_dir)

    first = write_run(tmp_path / "a" / "seed0", "/tmp/sweepcache")
    assert write_run(tmp_path / "elsewhere" / "run", "/root/.cache/medcomp") == first
    assert set(first) == {"02_layer_importance", "03_prune"}
    other_answer = write_run(tmp_path / "b", "/tmp/sweepcache", answer="This is eczema.")
    assert other_answer["03_prune"] != first["03_prune"] and other_answer["02_layer_importance"] == first["02_layer_importance"]
    assert write_run(tmp_path / "c", "/tmp/sweepcache", split="train")["03_prune"] != first["03_prune"]


def test_numerics_environment_sets_pins_when_pinned_and_removes_them_when_default(monkeypatch):
    from medcomp import numerics

    shell = {"PATH": "/bin", "MKL_CBWR": "AVX2", "HOME": "/root"}  # a shell's left-over pin
    assert numerics.numerics_environment("default", shell) == {"PATH": "/bin", "HOME": "/root"}
    assert numerics.numerics_environment("pinned", {"PATH": "/bin"}) == {"PATH": "/bin", **numerics.PINNED_ENV}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    numerics.set_for_children("pinned")  # a sweep's pinned point after a default one, and back
    assert numerics.active_pins() == numerics.PINNED_ENV and numerics.in_mode("pinned") and not numerics.in_mode("default")
    numerics.set_for_children("default")
    assert numerics.active_pins() == {name: None for name in numerics.PINNED_ENV} and numerics.in_mode("default")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with numerics.children_in("pinned"):
        assert numerics.in_mode("pinned")
    assert numerics.active_pins() == {**{name: None for name in numerics.PINNED_ENV}, "MKL_CBWR": "COMPATIBLE"}, "given back"


def test_embedded_cache_keys_follow_the_seed_and_the_numerics(tmp_path):
    """A pinned run must not reuse a default-built bootstrap (the reference's assembled models differ
    by numerics), and a seed sweep redoes the bootstrap, while the pretraining images stay shared."""
    from medcomp.embedded import embedded_spec, resolve_model_source
    from medcomp.params import load_params

    names = {}
    for seed, numerics in [(0, "default"), (0, "pinned"), (1, "default")]:
        params = load_params("embedded", {"seed": seed, "runtime": {"numerics": numerics}})
        names[seed, numerics] = _cache_names(params, tmp_path)
    assert names[0, "default"]["assembled"] != names[0, "pinned"]["assembled"]
    assert names[0, "default"]["pretrained"] != names[0, "pinned"]["pretrained"]
    assert names[0, "default"]["pretrained"] != names[1, "default"]["pretrained"]
    assert names[0, "default"]["assembled"] != names[1, "default"]["assembled"]  # the tower's initialisation
    assert len({n["images"] for n in names.values()}) == 1  # one set of pretraining images for all


def _cache_names(params, cache: Path) -> dict[str, str]:
    """The folders ``resolve_model_source`` would read, found by marking each one built as it asks."""
    from unittest import mock

    from medcomp import embedded

    seen: dict[str, str] = {}

    def build_assembled(directory, **_):
        seen["assembled"] = directory.name
        (directory).mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text("{}")

    def build_images(root, *_):
        root.mkdir(parents=True, exist_ok=True)
        (root / "captions.jsonl").write_text("")

    def build_pretrained(assembled, pretrained, images_root, *_, seed):
        seen["pretrained"], seen["images"], seen["training seed"] = pretrained.name, images_root.name, seed

    with mock.patch.object(embedded, "build_embedded_llava", build_assembled), \
            mock.patch("medcomp.synthetic.generate_captioned_images", build_images), \
            mock.patch("medcomp.pretraining.build_pretrained_embedded_llava", build_pretrained):
        embedded.resolve_model_source(params.model.id, embedded.embedded_spec(params), cache, tuple, params.runtime.numerics)
    assert seen["training seed"] == 1000 + params.seed
    return seen


def test_tidy_frees_each_sweep_points_rebuildable_folders_and_keeps_the_rest(tmp_path, capsys):
    from medcomp.__main__ import main
    from medcomp.stages.materialise import prune_recipe

    sweep = tmp_path / "sweep"
    (sweep / "points").mkdir(parents=True)
    for point in ("seed0", "seed1"):
        run = Run(sweep / point)
        for name, recipe in (("finetuned", None), ("pruned-1", prune_recipe("finetuned", [1], "float32")), ("pruned-1-awq", None)):
            folder = run.stage_dir("03") / name
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
            run.register_variant(Variant(name=name, stage="03", path=str(folder), parent=None if name == "finetuned" else "finetuned",
                                         extra={"rebuild": recipe} if recipe else {}))
    from medcomp.executors import STAGES

    def finish(point, stages):
        for stage in stages:
            (Run(sweep / point).stage_dir(stage) / "status.json").write_text(json.dumps({"status": "ok"}))

    finish("seed0", STAGES)
    finish("seed1", STAGES[:3])  # still running
    assert main(["tidy", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would free 0.00 GB in 1 run folder(s)" in out and "not finished (a stage is not ok): seed1" in out
    assert (sweep / "seed0/stages/03/pruned-1").is_dir()  # a dry run deletes nothing
    finish("seed1", STAGES)
    assert main(["tidy", str(sweep)]) == 0
    assert capsys.readouterr().out.count("deleted") == 2
    for point in ("seed0", "seed1"):  # only the folder with a recipe: the 4-bit one and the recipe's parent stay
        assert sorted(p.name for p in (sweep / point / "stages/03").iterdir()) == ["finetuned", "pruned-1-awq"]
    assert main(["tidy", str(tmp_path / "nothing")]) == 2 and "neither a run folder" in capsys.readouterr().err
