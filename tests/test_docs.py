"""Numbers in the docs are generated: results files are machine-written, and the committed pages equal their rendering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from medcomp import results

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_docs_are_what_python_m_medcomp_docs_renders():
    assert results.write_docs(ROOT, check=True) == [], "run `python -m medcomp docs` and commit what it writes"


def test_a_changed_result_makes_the_readme_and_the_results_page_stale(tmp_path):
    for name in ("README.md", "docs", "results"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    assert results.write_docs(tmp_path, check=True) == []
    records = {path: json.loads(path.read_text()) for path in sorted((tmp_path / "results").glob("*.json"))}
    path = max(reversed(list(records)), key=lambda p: records[p].get("point count") or 0)  # the headline's sweep
    record = records[path]
    record["score spread"]["recovered-7-awq"]["mean"] = 12.3
    path.write_text(json.dumps(record))
    assert set(results.write_docs(tmp_path, check=True)) == {tmp_path / "README.md", tmp_path / "docs" / "results.md"}
    results.write_docs(tmp_path)
    assert f"12.3 ± {record['score spread']['recovered-7-awq']['sd']:.1f} (`recovered-7-awq`)" in (tmp_path / "README.md").read_text()
    assert results.write_docs(tmp_path, check=True) == []


def test_the_params_page_has_every_key_of_the_schema_with_its_description():
    page = results.params_page()
    assert "| `runtime.numerics` | `Literal['auto', 'default', 'pinned', 'portable']` | `'default'` |" in page
    assert "| `model.gpus` | `int` | `1` | GPUs one model is split over" in page
    assert "| `run_name` | `str` | `required` | a plain folder name under reports/ |" in page


def _fake_run(run_dir: Path, seed: int, pipeline: float, verdict: str, difference: str) -> Path:
    tables = run_dir / "stages" / "07_judge" / "tables"
    tables.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"written_at": "2026-12-05T10:00:00", "git": {"commit": "abcdef1234"},
                                                       "params": {"run_name": f"p{seed}", "world": "embedded", "seed": seed},
                                                       "numerics": {"mode": "pinned", "cpu": "test CPU"}}))
    pd.DataFrame({"score": [98.0, pipeline]}, index=pd.Index(["finetuned", "recovered-7-awq"], name="variant")).to_csv(tables / "scores.csv")
    pd.DataFrame({"difference [95% CI]": [difference], "verdict": [verdict]}, index=pd.Index(["the pipeline beats X"], name="claim")).to_csv(tables / "verdicts.csv")
    pd.DataFrame({"variant": ["finetuned", "recovered-7-awq"]}, index=pd.Index(["Original LLaVA", "Prune + SFT + Quant"], name="method")).to_csv(tables / "table_4.csv")
    return run_dir


def test_a_sweep_writes_its_points_the_score_spread_and_the_verdicts_over_points(tmp_path):
    _fake_run(tmp_path / "seed0", 0, 60.0, "holds", "+5.0 [+1.0, +9.0]")
    _fake_run(tmp_path / "seed1", 1, 70.0, "within noise", "+1.0 [-2.0, +4.0]")
    path = results.write_sweep_results(tmp_path, {"seed0": {"seed": 0}, "seed1": {"seed": 1}})
    record = json.loads(path.read_text())
    assert record["kind"] == "sweep" and record["point count"] == 2 and record["git"]["commit"] == "abcdef1234"
    assert record["points"]["seed1"]["scores"] == {"finetuned": 98.0, "recovered-7-awq": 70.0}
    assert record["score spread"]["recovered-7-awq"] == {"points": {"seed0": 60.0, "seed1": 70.0}, "mean": 65.0, "sd": 7.07, "range": 10.0}
    assert record["verdicts over points"]["the pipeline beats X"]["verdict over points"] == "mixed"
    assert record["verdicts over points"]["the pipeline beats X"]["interval over points"] == "[-2.0, +9.0]"
    table = results.headline_table([{**record, "file": "x.json"}])
    assert "| Prune + SFT + Quant | 54.25 | 0.68× | 65.0 ± 7.1 (`recovered-7-awq`) | 0.66× |" in table and "2026-12-05, `abcdef1`" in table
    shorter = {**record, "file": "y.json", "point count": 1, "score spread": {"recovered-7-awq": {"mean": 10.0, "sd": 0.0}}}
    assert "65.0 ± 7.1" in results.headline_table([{**record, "file": "x.json"}, shorter])  # a newer sweep of fewer seeds does not displace it
    assert "(`y.json`" not in results.headline_table([{**record, "file": "x.json"}, shorter])
    assert "`results/z.json`" in results.headline_table([{**record, "file": "x.json"}, {**record, "file": "z.json"}])  # ties: the newest


def test_results_records_carry_each_variants_bytes_decode_and_recovery_time(tmp_path):
    run_dir = _fake_run(tmp_path / "seed0", 0, 60.0, "holds", "+5.0 [+1.0, +9.0]")
    (run_dir / "stages" / "06_benchmark").mkdir(parents=True)
    (run_dir / "stages" / "06_benchmark" / "benchmark.json").write_text(json.dumps({"measurements": [
        {"variant": "finetuned", "model_bytes": 1000, "decode_ms": [50.0, 40.0, 45.0]}, {"variant": "x", "model_bytes": 9, "decode_ms": []}]}))
    for stage, name, seconds in (("04_sft_pruned", "recovered-7", 30.0), ("08_beyond", "recovered-7-streamline", 31.0)):
        (run_dir / "stages" / stage / name).mkdir(parents=True)
        (run_dir / "stages" / stage / name / "recovery.json").write_text(json.dumps({"result": {"SFT seconds": seconds}}))
    (run_dir / "stages" / "08_beyond" / "streamline-abc.json").write_text(json.dumps({"span": [12, 20], "seconds": 40.0}))
    record = results.run_results(run_dir)
    assert record["efficiency"] == {"finetuned": {"model bytes": 1000, "decode ms/token": 45.0}}  # the median; unmeasured left out
    assert record["training seconds"] == {"recovered-7": 30.0, "recovered-7-streamline": 31.0, "pruned-7-streamline": 40.0}


def test_a_sweeps_label_names_every_commit_its_points_ran_at():
    record = {"date": "2026-12-05T21:32:42+00:00", "git": {"commit": "7ed372319264"},
              "points": {"seed0": {"git": {"commit": "7ed372319264"}}, "seed1": {"git": {"commit": "083e0565adca"}},
                         "seed2": {"git": {"commit": "083e0565adca"}}, "seed3": {}}}
    assert results.label(record) == "2026-12-05, `7ed3723`, `083e056`"
    assert results.label({"date": "2026-12-04", "git": {"commit": "532f71a0"}}) == "2026-12-04, `532f71a`"
