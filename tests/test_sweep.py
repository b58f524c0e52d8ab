"""Papermill sweeps: the grid, the aggregation over points, and a real two-point sweep."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medcomp.params import ParamsError
from medcomp.sweep import grid, nested, score_spread, verdicts_over_points


def test_the_grid_is_every_combination_with_values_read_as_yaml():
    points = grid(["seed=0,1", "finetune.learning_rate=1e-3,5e-3"])
    assert points == [{"seed": 0, "finetune.learning_rate": 1e-3}, {"seed": 0, "finetune.learning_rate": 5e-3},
                      {"seed": 1, "finetune.learning_rate": 1e-3}, {"seed": 1, "finetune.learning_rate": 5e-3}]
    assert nested("finetune.lora.r", 4) == {"finetune": {"lora": {"r": 4}}}
    for bad in ("seed", "seed=", "9x=1", "a..b=1"):
        with pytest.raises(ParamsError):
            grid([bad])
    with pytest.raises(ParamsError, match="twice"):
        grid(["seed=1", "seed=2"])


def _verdicts(*rows):
    return pd.DataFrame([{"claim": c, "difference [95% CI]": d, "verdict": v} for c, d, v in rows]).set_index("claim")


def test_a_claim_holds_over_seeds_only_where_every_seed_holds():
    table = verdicts_over_points({
        "seed0": _verdicts(("A", "+5.0 [+1.0, +9.0]", "holds"), ("B", "+3.0 [+0.5, +6.0]", "holds"), ("C", "-4.0 [-8.0, -1.0]", "does not hold")),
        "seed1": _verdicts(("A", "+6.0 [+2.5, +9.5]", "holds"), ("B", "+1.0 [-2.0, +4.0]", "within noise"), ("C", "-2.0 [-5.0, -0.5]", "does not hold")),
        "seed2": _verdicts(("A", "+4.0 [+0.2, +8.0]", "holds"), ("B", "+2.0 [+0.1, +3.9]", "holds"), ("C", "-3.0 [-6.0, -0.1]", "does not hold")),
    })
    assert table.loc["A", "verdict over points"] == "holds" and table.loc["A", "holds on"] == 3
    assert table.loc["B", "verdict over points"] == "mixed" and table.loc["B", "holds on"] == 2 and table.loc["B", "within noise on"] == 1
    assert table.loc["C", "verdict over points"] == "does not hold"
    assert table.loc["A", "interval over points"] == "[+0.2, +9.5]"  # the union: item noise and seed spread
    assert table.loc["A", "mean difference"] == 5.0


def test_score_spread_over_points():
    spread = score_spread({"seed0": pd.DataFrame({"score": [80.0, 50.0]}, index=["finetuned", "pipeline"]),
                           "seed1": pd.DataFrame({"score": [90.0, 40.0]}, index=["finetuned", "pipeline"])})
    assert spread.loc["finetuned", "mean"] == 85.0 and spread.loc["pipeline", "range"] == 10.0
    assert spread.loc["finetuned", "sd"] == pytest.approx(7.07, abs=0.01)


def test_the_index_says_where_each_point_ran_and_flags_a_point_on_another_cpu(tmp_path):
    from medcomp.sweep import where_points_ran

    points = {}
    for name, cpu, job in (("seed0", "Intel Xeon", "11"), ("seed1", "AMD EPYC", "12")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"numerics": {"cpu": cpu}}))
        points[name] = {"name": name, "executor": "slurm", "status": "ok", "host": f"node-{job}", "job_id": job, "gpus": "0", "seconds": 61.0,
                        "reason": None}
    (tmp_path / "points.json").write_text(json.dumps(points))
    table = where_points_ran(tmp_path)
    assert table.loc["seed1", "job_id"] == "12" and table.loc["seed1", "host"] == "node-12"
    assert list(table["other CPU than the first"]) == [False, True]


def test_the_frontier_over_points_is_each_points_ratio_averaged_with_its_spread(tmp_path):
    from medcomp.benchmark import Measurement, save_measurements
    from medcomp.sweep import frontier_over_points

    def point(name: str, finetuned_score: float, pipeline_score: float, pipeline_decode: float) -> None:
        tables = tmp_path / name / "stages" / "07_judge" / "tables"
        tables.mkdir(parents=True)
        pd.DataFrame({"score": [finetuned_score, pipeline_score]}, index=pd.Index(["finetuned", "pipeline"], name="variant")).to_csv(tables / "scores.csv")
        measured = [Measurement(v, "s", 100, bits, 30, size, size, size, 0, 0, 0.0, prefill_ms=[1.0], decode_ms=[decode], split_ms={})
                    for v, bits, size, decode in (("finetuned", 16, 4_000_000, 10.0), ("pipeline", 4, 1_000_000, pipeline_decode))]
        bench = tmp_path / name / "stages" / "06_benchmark"
        bench.mkdir(parents=True)
        save_measurements(bench, measured, {})

    point("seed0", 80.0, 60.0, 5.0)  # 0.75 of its own finetuned model
    point("seed1", 100.0, 65.0, 7.0)  # 0.65: ratios are per point, then averaged
    table = frontier_over_points(tmp_path, ["seed0", "seed1", "seed2"])  # seed2 has nothing yet
    assert table.loc["pipeline", "score × finetuned"] == pytest.approx(0.70)
    assert table.loc["pipeline", "score × finetuned sd"] == pytest.approx(0.0707, abs=1e-3)
    assert table.loc["pipeline", "model MB × finetuned"] == pytest.approx(0.25) and table.loc["pipeline", "decode × finetuned"] == pytest.approx(0.6)
    assert table.loc["pipeline", "points"] == 2 and table.loc["finetuned", "score × finetuned"] == 1.0
