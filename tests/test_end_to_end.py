"""The runner on real notebooks: embedded default (minimal), real-scale stand-in, failure and rerun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medcomp.params import PRESETS_DIR, merge_overrides
from medcomp.runs import Run

pytestmark = pytest.mark.slow

MINIMAL = {
    "run_name": "e2e",
    "model": {"embedded": {"pretraining": {"images_per_disease": 4, "image_size": 64, "vision_steps": 4, "vision_batch_size": 8,
                                           "stage1_steps": 2, "stage1_batch_size": 4}}},
    "data": {"test_images": 8, "validation_per_disease": 1, "synthetic": {"train_per_disease": 2, "test_per_disease": 1, "image_size": 64}},
    "finetune": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "save_steps": 50},
    "evaluation": {"max_new_tokens": 8, "batch_size": 8, "sample_answers": 3},
    "importance": {"calibration_size": 4, "max_new_tokens": 4, "batch_size": 4},
    "pruning": {"levels": [0.0, 0.0625, 0.21875], "magnitude_level": 0.21875},
    "recovery": {"levels": [0.21875], "finetune": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "multi_turn": False,
                                                   "compute_dtype": "float32", "mixed_precision": "no", "lora": {"r": 16, "alpha": 8}}},
    # every path once: AWQ (the slowest, about 4 s a layer here) on one model only
    "quantization": {"calibration_size": 2, "finetuned": ["bnb", "rtn"], "pruned": ["awq"], "recovered": ["rtn"], "pipeline_ablations": [],
                     "recovered_magnitude": []},
    # distillation is settled and off in the embedded preset (embedded_full runs it): on here, so its path stays tested
    "beyond": {"grid": "rtn", "quantize_then_recover": ["awq"], "replacement_steps": 5, "replacement_samples": 8, "distill_from": "finetuned"},
    "benchmark": {"new_tokens": 4, "warmup": 1, "repeats": 2},
}


def write_params(path: Path, preset: str, overrides: dict) -> Path:
    raw = yaml.safe_load((PRESETS_DIR / f"{preset}.yaml").read_text())
    path.write_text(yaml.safe_dump(merge_overrides(raw, overrides)))
    return path


SECRET = "sk-e2e-never-written-0123456789"  # a key in the environment, as a user running the openai judge has one


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDCOMP_CACHE": str(cache), "OPENAI_API_KEY": SECRET}
    return subprocess.run([sys.executable, "-m", "medcomp", *args], capture_output=True, text=True, env=env, timeout=3600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return Path(os.environ.get("MEDCOMP_CACHE") or tmp_path_factory.mktemp("cache"))


def test_minimal_embedded_run_renders_reports_and_reuses_finished_stages(tmp_path, cache):
    params = write_params(tmp_path / "minimal.yaml", "embedded", MINIMAL)
    run_dir = tmp_path / "run"
    first = run_cli("run", str(params), "--run-dir", str(run_dir), cache=cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    index = (run_dir / "index.html").read_text()
    assert "01_finetune" in index and ">ok<" in index and "not the paper" in index
    assert "02_layer_importance" in index and "03_prune" in index and ">failed<" not in index
    report = (run_dir / "01_finetune.html").read_text()
    assert "Held-out disease-naming accuracy" in report and "data:image/png;base64" in report
    assert "before the finetune" in report and "embedded pretraining (bootstrap, cached)" in report
    assert "<details" in report, "code cells are folded"
    for noise in ("GPT-QModel", "IProgress not found", "_pytree.py", "kernels-community", "Loading weights", "Writing model shards",
                  "Training Loss", "torchvision"):
        assert noise not in report, f"library noise in the report: {noise}"
    importance_report = (run_dir / "02_layer_importance.html").read_text()
    assert "Figure 3" in importance_report and "Figure 2" in importance_report and "Spearman" in importance_report
    rankings = json.loads((run_dir / "stages" / "02_layer_importance" / "rankings.json").read_text())
    assert set(rankings["orders"]) == {"similarity", "magnitude", "block_influence", "perplexity"} and rankings["num_layers"] == 30
    prune_report = (run_dir / "03_prune.html").read_text()
    assert "Table 1" in prune_report and "Figure B2" in prune_report and "paper: score" in prune_report
    run = Run(run_dir)
    assert {"finetuned", "pruned-2", "pruned-7", "pruned-7-magnitude", "recovered-7", "recovered-7-magnitude"} <= set(run.variants())
    assert run.variant("finetuned").path.endswith("stages/01_finetune/merged")
    assert json.loads(run.registry_path.read_text())["variants"]["finetuned"]["path"] == "./stages/01_finetune/merged"  # run-relative
    assert len(run.variant("pruned-7").layers_removed) == 7 and run.variant("pruned-7").parent == "finetuned"
    assert run.variant("pruned-7").layers_removed == tuple(sorted(rankings["orders"]["similarity"][:7]))
    for variant in ("finetuned", "pruned-2", "pruned-7", "pruned-7-magnitude"):
        assert len(run.answers(variant)) == 8 * 3
    recovery_report = (run_dir / "04_sft_pruned.html").read_text()
    assert "Table 2" in recovery_report and "paper: score after SFT" in recovery_report
    assert run.variant("recovered-7").parent == "pruned-7" and run.variant("recovered-7-magnitude").parent == "pruned-7-magnitude"
    quantize_report = (run_dir / "05_quantize.html").read_text()
    for text in ("Figure 4", "Table 3", "Table 4", "Table 5", "What survives quantization", "paper: score AWQ"):
        assert text in quantize_report, text
    for noise in ("GPT-QModel", "Loading weights", "INFO "):
        assert noise not in quantize_report, f"library noise in the report: {noise}"
    for variant in ("finetuned-bnb", "finetuned-qlora", "pruned-7-awq", "recovered-7-rtn", "recovered-7-qlora", "pruned-7-awq-sft",
                    "finetuned-rtn-qalora", "recovered-7-rtn-qalora", "finetuned-rtn-lora", "recovered-7-rtn-lora"):
        assert run.variant(variant).bits == 4 and len(run.answers(variant)) == 8 * 3, variant
    streamline = run.variant("pruned-7-streamline")  # 8 contiguous blocks out, one trained block in: pruned-7's depth
    start, stop = streamline.extra["rebuild"]["start"], streamline.extra["rebuild"]["stop"]
    assert stop - start == 8 and streamline.layers_removed == tuple(range(start + 1, stop)) and 2 <= start and stop <= 29
    assert streamline.parameters == run.variant("pruned-7").parameters and run.variant("recovered-7-streamline").parent == "pruned-7-streamline"
    for variant in ("finetuned-gptq", "recovered-7-gptq", "recovered-7-kd", "recovered-7-kd50", "pruned-7-streamline", "recovered-7-streamline"):
        assert len(run.answers(variant)) == 8 * 3, variant
    assert run.variant("finetuned-gptq").extra["format"] == "int4" and run.variant("recovered-7-kd").parent == "pruned-7"
    replaced_4bit = [run.variant(f"{name}-streamline-gptq") for name in ("pruned-7", "recovered-7") if f"{name}-streamline-gptq" in run.variants()]
    assert len(replaced_4bit) == 1, "one replaced model, chosen on validation, goes through GPTQ"
    assert replaced_4bit[0].extra["format"] == "int4" and replaced_4bit[0].layers_removed == streamline.layers_removed
    assert len(run.answers(replaced_4bit[0].name)) == 8 * 3
    for variant, blocks in (("finetuned-rtn-qalora", 30), ("recovered-7-rtn-qalora", 30 - 7), ("recovered-7-rtn-qalora-kd", 30 - 7)):
        extra = run.variant(variant).extra
        assert extra["format"] == "int4" and extra["adapters folded"] == blocks * 7 and extra["fold error"] < 1e-5, variant
    beyond_report = (run_dir / "08_beyond.html").read_text()
    for text in ("fold error (fp32)", "Chosen on validation", "validation naming", "re-ranking after each removal", "one trained block in place of a run"):
        assert text in beyond_report, text
    benchmark_report = (run_dir / "06_benchmark.html").read_text()
    for text in ("Table 4, efficiency columns", "decode ms/token", "Where a decoded token", "What a T4 would be bound by", "paper: VRAM GB"):
        assert text in benchmark_report, text
    measured = json.loads((run_dir / "stages" / "06_benchmark" / "benchmark.json").read_text())["measurements"]
    assert {m["variant"] for m in measured} == set(run.variants()) and all(len(m["decode_ms"]) == 2 for m in measured)
    judge_report = (run_dir / "07_judge.html").read_text()
    for text in ("Proxy scores", "Table 1 · pruning levels", "Table 2", "Table 3", "Table 4 · overall", "Table 5", "Figure 5",
                 "Pareto front", "claims, and this package's, on this run", "the frontier", "paper: score", "95% CI"):
        assert text in judge_report, text
    assert any(verdict in judge_report for verdict in ("holds", "within noise", "does not hold"))
    judgements = (run_dir / "stages" / "07_judge" / "judgements.jsonl").read_text().splitlines()
    assert judgements and all(json.loads(line)["judge"].startswith("proxy:") for line in judgements)
    import pandas as pd

    tables = run_dir / "stages" / "07_judge" / "tables"  # the report's tables, as data: numbers, not headings
    scores = pd.read_csv(tables / "scores.csv", index_col=0)
    assert {"finetuned", "pruned-7", "recovered-7", "finetuned-bnb", "pruned-7-awq", "recovered-7-rtn"} <= set(scores.index)
    assert scores["score"].between(25, 100).all() and (scores["95% CI low"] <= scores["score"]).all() and (scores["score"] <= scores["95% CI high"]).all()
    assert (scores["valid"] + scores["invalid"] + scores["failed"] == 8 * 3).all()  # every test item of every variant
    record = json.loads((run_dir / "results.json").read_text())  # the machine-readable record: the same numbers as the tables
    assert record["scores"] == pytest.approx(scores["score"].to_dict()) and record["table 4"]["Original LLaVA"] == "finetuned"
    assert record["git"] == json.loads((run_dir / "manifest.json").read_text())["git"] and "01_finetune" in record["stage seconds"]
    verdicts = pd.read_csv(tables / "verdicts.csv", index_col=0)
    assert len(verdicts) >= 2 and set(verdicts["verdict"]) <= {"holds", "does not hold", "within noise"}  # the minimal run has the cells for two claims
    table_1 = pd.read_csv(tables / "table_1.csv", index_col=0)
    assert list(table_1["layers removed"]) == [0, 2, 7] and table_1["score [95% CI]"].str.match(r"^\d+\.\d \[\d+\.\d, \d+\.\d\]$").all()
    index = (run_dir / "index.html").read_text()
    assert index.index("Headline") < index.index("<h2>Notebooks</h2>") and "Table 4 in short" in index and "proxy score" in index
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["params"]["run_name"] == "e2e" and manifest["packages"]["peft"]
    for written in run_dir.rglob("*"):  # reports, executed notebooks, manifest, registry, judgement cache, logs
        if written.is_file() and written.suffix in {".html", ".ipynb", ".json", ".jsonl", ".txt", ".log", ".md"}:
            assert SECRET not in written.read_text(errors="ignore"), f"the API key leaked into {written}"

    from browser import check_in_browser  # the index and two reports as a reader's Chromium shows them

    for page, figures in (("index.html", 0), ("01_finetune.html", 2), ("05_quantize.html", 1), ("08_beyond.html", 1)):
        seen = check_in_browser(run_dir / page, tmp_path / "browser" / page)
        assert seen["errors"] == [], f"{page} shows error or stderr output: {seen['errors']}"
        assert seen["images"] >= figures and seen["broken"] == 0 and seen["nan"] == 0, (page, seen)
        if page != "index.html":
            assert seen["folds"] > 0 and seen["closedHidden"] and seen["openShown"] and seen["closedAgain"], (page, seen)

    from medcomp.runner import RUN_ORDER

    again = run_cli("run", str(params), "--run-dir", str(run_dir), cache=cache)
    assert again.returncode == 0 and again.stdout.count("reusing the finished stage") == len(RUN_ORDER) == 8

    # A run folder saved in one session and restored in another (Kaggle: output attached as input) is a
    # copy: new paths, new modification times. 04 is made to run again, as if interrupted before it finished.
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, copy_function=os.link)  # new names, the same bytes: a second 9 GB copy once filled CI's disk
    shutil.rmtree(run_dir)
    (moved / "stages" / "04_sft_pruned" / "status.json").unlink()
    checkpoints = sorted(p for p in moved.glob("stages/0[45]_*/*/**/model.safetensors")) + sorted(moved.glob("stages/05_quantize/*/*.safetensors"))
    written = {p: p.stat().st_mtime_ns for p in checkpoints}
    continued = run_cli("run", str(params), "--run-dir", str(moved), cache=cache)
    assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
    assert continued.stdout.count("reusing the finished stage") == 3  # 01-03; 04 reran, so 05, 08, 06 and 07 follow it
    recovery = (moved / "04_sft_pruned.ipynb").read_text()
    assert "recovered-7: reused" in recovery and "trained" not in recovery.split("recovered-7: reused")[0][-200:]
    assert written and all(p.stat().st_mtime_ns == mtime for p, mtime in written.items()), "a checkpoint was rebuilt after the move"
    variants = Run(moved).variants().values()
    assert not any(str(run_dir) in json.dumps([v.path, v.extra]) for v in variants), "a registry path still points at the old folder"
    assert all(Path(v.path).exists() for v in variants)


def _numbers(cell: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", str(cell))]


def test_kaggle_t4_runs_01_to_08_on_a_32_layer_fp16_standin(tmp_path, cache, synthetic_root):
    """The real path end to end: LLaVA-1.5-7B's depth (32 layers), fp16, its template and vision
    reading, every quantized dimension a multiple of 64; 07 through the openai backend against a fake
    server on loopback, the key from the environment."""
    import pandas as pd

    from medcomp.rehearsal import LoopbackJudge, write_standin_params
    from medcomp.standin import build_llava15_standin

    standin = build_llava15_standin(tmp_path / "standin")
    with LoopbackJudge() as server:
        params = write_standin_params(tmp_path / "t4.yaml", standin, synthetic_root, server.url, device="cpu")
        run_dir = tmp_path / "run"
        result = run_cli("run", str(params), "--run-dir", str(run_dir), cache=cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    variants = Run(run_dir).variants()
    assert variants["finetuned"].bits == 16 and not variants["finetuned"].layers_removed
    expected_removed = {"pruned-2": 2, "pruned-4": 4, "pruned-7": 7, "pruned-8": 8, "pruned-9": 9, "pruned-10": 10, "pruned-7-magnitude": 7,
                        "recovered-7": 7, "recovered-9": 9, "recovered-7-magnitude": 7}
    for name, removed in expected_removed.items():
        config = json.loads((Path(variants[name].path) / "config.json").read_text())
        assert len(variants[name].layers_removed) == removed and config["text_config"]["num_hidden_layers"] == 32 - removed, name
    four_bit = {"finetuned-awq", "finetuned-bnb", "pruned-7-awq", "recovered-7-awq", "recovered-7-bnb", "recovered-7-rtn", "recovered-9-awq",
                "recovered-9-bnb", "recovered-7-magnitude-awq", "finetuned-qlora", "recovered-7-qlora",  # 08's below
                "finetuned-gptq", "recovered-7-gptq", "finetuned-awq-qalora", "recovered-7-awq-qalora", "finetuned-awq-lora", "recovered-7-awq-lora",
                "recovered-7-awq-qalora-kd"}
    assert four_bit <= set(variants) and all(variants[name].bits == 4 for name in four_bit)
    assert {"recovered-7-kd", "recovered-7-kd50"} <= set(variants)  # distilled recoveries of the fp16 stand-in
    streamline = variants["pruned-7-streamline"]  # one fp32-trained block saved into the fp16 model, 25 blocks as pruned-7
    config = json.loads((Path(streamline.path) / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 25 and config["text_config"]["dtype"] == "float16" and "recovered-7-streamline" in variants
    replaced_4bit = {f"{name}-streamline-gptq" for name in ("pruned-7", "recovered-7")} & set(variants)  # prune, replace, GPTQ on the stand-in
    assert len(replaced_4bit) == 1 and variants[replaced_4bit.pop()].bits == 4
    for name in ("finetuned-awq-qalora", "recovered-7-awq-qalora", "recovered-7-awq-qalora-kd"):  # folded in fp16 activations: fp16's rounding
        assert variants[name].extra["adapters folded"] > 0 and variants[name].extra["fold error"] < 1e-2, name

    measured = json.loads((run_dir / "stages" / "06_benchmark" / "benchmark.json").read_text())["measurements"]
    by_name = {m["variant"]: m for m in measured}
    assert set(by_name) == set(variants), "06 measures every variant"
    assert all(m["decode_ms"] and min(m["decode_ms"]) > 0 and m["model_bytes"] > 0 for m in measured)
    for name in four_bit - {"finetuned-qlora", "recovered-7-qlora", "finetuned-awq-lora", "recovered-7-awq-lora"}:  # unmerged adapters aside
        assert by_name[name]["decoder_bytes"] < 0.35 * by_name["finetuned"]["decoder_bytes"], name  # 4-bit, scales included

    tables = run_dir / "stages" / "07_judge" / "tables"
    scores = pd.read_csv(tables / "scores.csv", index_col=0)
    assert set(scores.index) == {name for name in variants if Run(run_dir).has_answers(name)}
    assert (scores["failed"] == 0).all() and (scores["invalid"] == 0).all()
    assert scores["score"].between(25, 100).all() and (scores["95% CI low"] <= scores["score"]).all() and (scores["score"] <= scores["95% CI high"]).all()
    for number in range(1, 6):
        table = pd.read_csv(tables / f"table_{number}.csv", index_col=0)
        cells = [v for column in table.columns if column.endswith("score [95% CI]") for v in table[column] if v != "—"]
        assert cells, f"Table {number} has no scores"
        for cell in cells:
            score, low, high = _numbers(cell)
            assert 25 <= low <= score <= high <= 100, (number, cell)
    verdicts = pd.read_csv(tables / "verdicts.csv", index_col=0)
    assert len([c for c in verdicts.index if not c.startswith("(this package)")]) == 6 and len(verdicts) > 6  # the paper's six, and 08's
    assert set(verdicts["verdict"]) <= {"holds", "does not hold", "within noise"}

    judgements = [json.loads(line) for line in (run_dir / "stages" / "07_judge" / "judgements.jsonl").read_text().splitlines()]
    assert judgements and all(j["judge"].startswith("openai:") for j in judgements)
    assert len(server.requests) == len(judgements)  # each distinct answer asked once
    assert all(r["headers"].get("authorization") == f"Bearer {SECRET}" for r in server.requests)
    for written in run_dir.rglob("*"):
        if written.is_file() and written.suffix in {".html", ".ipynb", ".json", ".jsonl", ".csv", ".txt", ".log", ".md"}:
            assert SECRET not in written.read_text(errors="ignore"), f"the API key leaked into {written}"
    index = (run_dir / "index.html").read_text()
    assert "Forecast for 2 Kaggle T4s" in index and index.count(">ok<") == 8  # kaggle_t4 plans both of Kaggle's T4s


def test_bad_params_fail_before_any_work(tmp_path, cache):
    params = write_params(tmp_path / "bad.yaml", "embedded", {"finetune": {"learnig_rate": 1}})
    result = run_cli("run", str(params), "--run-dir", str(tmp_path / "run"), cache=cache)
    assert result.returncode == 2 and "finetune.learnig_rate: unknown key" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_stage_that_declares_itself_incomplete_exits_nonzero_and_reruns(tmp_path, cache, monkeypatch):
    """07 with an unreachable judge: every answer failed, the stage is incomplete, not ok and reused."""
    import nbformat

    from medcomp.runner import run_pipeline

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    stage = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    stage.cells = [nbformat.v4.new_code_cell('params_file = "auto"\nrun_dir = None', metadata={"tags": ["parameters"]}),
                   nbformat.v4.new_code_cell("from medcomp.runs import Run\nimport pathlib\nrun = Run(run_dir)\n"
                                             "flag = pathlib.Path(run_dir) / 'judge_is_up'\n"
                                             "run.mark_incomplete('01_judge', None if flag.exists() else '3 of 3 answers could not be judged (APIConnectionError: 3)')")]
    nbformat.write(stage, str(notebooks / "01_judge.ipynb"))
    monkeypatch.setenv("MEDCOMP_CACHE", str(cache))
    params = write_params(tmp_path / "p.yaml", "embedded", MINIMAL)
    first = run_pipeline(params, run_dir=tmp_path / "run", notebooks_dir=notebooks)
    assert [o.status for o in first] == ["incomplete"] and "could not be judged" in first[0].error
    index = (tmp_path / "run" / "index.html").read_text()
    assert 'class="incomplete"' in index and "3 of 3 answers could not be judged" in index
    (tmp_path / "run" / "judge_is_up").touch()
    second = run_pipeline(params, run_dir=tmp_path / "run", notebooks_dir=notebooks)
    assert [o.status for o in second] == ["ok"] and "incomplete" in second[0].reason  # rerun, not reused


def test_a_failing_notebook_stops_the_run_and_is_shown(tmp_path, cache, monkeypatch):
    import nbformat

    from medcomp.runner import run_pipeline

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    broken = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    broken.cells = [nbformat.v4.new_code_cell('params_file = "auto"\nrun_dir = None', metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell("raise RuntimeError('stage exploded')")]
    nbformat.write(broken, str(notebooks / "01_broken.ipynb"))
    nbformat.write(nbformat.v4.new_notebook(), str(notebooks / "02_after.ipynb"))
    monkeypatch.setenv("MEDCOMP_CACHE", str(cache))
    params = write_params(tmp_path / "p.yaml", "embedded", MINIMAL)
    outcomes = run_pipeline(params, run_dir=tmp_path / "run", notebooks_dir=notebooks)
    assert [o.status for o in outcomes] == ["failed", "not run"]
    assert "stage exploded" in outcomes[0].error
    assert (tmp_path / "run" / "01_broken.ipynb").exists()
    index = (tmp_path / "run" / "index.html").read_text()
    assert "failed" in index and "stage exploded" in index
