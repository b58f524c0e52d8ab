"""The issues' goals over a sweep record: ratios within a point then averaged, each threshold checked."""

import pandas as pd
import pytest

from medcomp.goals import Goal, goal_verdicts, goals_table, issue_goals, time_budget_table, time_budget_verdicts


def _point(scores, efficiency, training=None):
    return {"scores": scores, "efficiency": {v: {"model bytes": b, "decode ms/token": d} for v, (b, d) in efficiency.items()},
            "training seconds": training or {}}


RECORD = {"table 4": {"Pruning and SFT": "recovered-7"}, "points": {
    "seed=0": _point({"finetuned": 100.0, "finetuned-awq": 90.0, "finetuned-gptq": 98.0, "recovered-7": 80.0, "recovered-7-kd": 96.0,
                      "recovered-7-streamline": 99.0, "pruned-7-streamline": 90.0},
                     {"finetuned": (1000, 50.0), "finetuned-awq": (340, 30.0), "finetuned-gptq": (340, 31.0)},
                     {"recovered-7": 100.0, "recovered-7-kd": 120.0, "recovered-7-streamline": 100.0, "pruned-7-streamline": 80.0}),
    "seed=1": _point({"finetuned": 50.0, "finetuned-awq": 45.0, "finetuned-gptq": 49.0, "recovered-7": 40.0, "recovered-7-kd": 44.0,
                      "recovered-7-streamline": 49.5, "pruned-7-streamline": 45.0},
                     {"finetuned": (1000, 50.0), "finetuned-awq": (340, 30.0), "finetuned-gptq": (340, 33.0)},
                     {"recovered-7": 100.0, "recovered-7-kd": 120.0, "recovered-7-streamline": 100.0, "pruned-7-streamline": 80.0}),
}}


def test_each_candidate_is_checked_against_every_threshold_of_its_goal():
    table = goals_table(RECORD)
    finetuned = "#31: a 4-bit finetuned model that keeps the finetune (score ≥ 0.97× finetuned's (mean); bytes ≤ 0.35× finetuned's; decode ≤ 1.05× finetuned-awq's)"
    gptq = table.loc[(finetuned, "finetuned-gptq")]
    assert gptq["points"] == 2 and gptq["score ratio (mean)"] == pytest.approx((0.98 + 0.98) / 2)
    assert gptq["bytes ratio"] == pytest.approx(0.34)
    assert gptq["decode ratio"] == pytest.approx((31 / 30 + 33 / 30) / 2)  # 1.067: too slow
    assert not gptq["meets the goal"]
    assert not table.loc[(finetuned, "finetuned-awq"), "meets the goal"]  # 0.90× the score
    recovery = next(goal for goal in table.index.get_level_values("goal") if goal.startswith("#32: a recovery"))
    assert recovery.endswith("(score ≥ 0.95× finetuned's (mean); no point below 0.9×; training time ≤ 1.5× recovered-7's)")
    kd = table.loc[(recovery, "recovered-7-kd")]  # 0.96 and 0.88 of the finetuned model: the mean passes, one seed does not
    assert kd["score ratio (mean)"] == pytest.approx(0.92) and kd["lowest point's ratio"] == pytest.approx(0.88)
    assert not kd["meets the goal"]
    streamline = table.loc[(recovery, "recovered-7-streamline")]  # its replaced block's 80 s counts: 180 s against 100 s
    assert streamline["training-time ratio"] == pytest.approx(1.8) and not streamline["meets the goal"]
    alone = table.loc[(recovery, "pruned-7-streamline")]  # the replaced block without SFT: its own 80 s only
    assert alone["training-time ratio"] == pytest.approx(0.8) and alone["score ratio (mean)"] == pytest.approx(0.9)
    verdicts = goal_verdicts(table)
    assert verdicts[recovery] == ("not met; the highest score ratio is `recovered-7-streamline`'s, 0.99× over 2 points, "
                                  "which fails: training time 1.800× > 1.5×")
    assert kd["fails"] == "score 0.920× < 0.95×; a point at 0.880× < 0.9×" and gptq["fails"] == "decode 1.067× > 1.05×"


def test_a_goal_is_met_by_the_candidates_that_pass_every_check():
    goal = Goal("fast enough", "finetuned", ("finetuned-gptq", "finetuned-awq"), 0.97, bytes_reference="finetuned", max_bytes_ratio=0.35,
                decode_reference="finetuned-awq", max_decode_ratio=1.10)
    table = goals_table(RECORD, [goal])
    assert list(table["meets the goal"]) == [True, False]
    assert goal_verdicts(table) == {"fast enough (score ≥ 0.97× finetuned's (mean); bytes ≤ 0.35× finetuned's; decode ≤ 1.1× finetuned-awq's)":
                                    "met by `finetuned-gptq`"}
    assert [g.reference for g in issue_goals("recovered-9")][1] == "recovered-9"
    assert goals_table({"points": {}}).empty


def test_the_combined_goal_counts_prune_replace_gptq_as_one_method_whichever_model_validation_picked():
    seed0 = _point({"finetuned": 100.0, "pruned-7-streamline-gptq": 95.0, "recovered-7-gptq": 85.0},
                   {"finetuned": (1000, 50.0), "recovered-7-awq": (300, 30.0), "pruned-7-streamline-gptq": (300, 30.5), "recovered-7-gptq": (300, 30.0)})
    seed1 = _point({"finetuned": 50.0, "recovered-7-streamline-gptq": 44.0, "recovered-7-gptq": 45.0},  # validation kept the SFT here
                   {"finetuned": (1000, 50.0), "recovered-7-awq": (300, 30.0), "recovered-7-streamline-gptq": (310, 33.0), "recovered-7-gptq": (300, 30.0)})
    table = goals_table({"table 4": {"Pruning and SFT": "recovered-7"}, "points": {"seed=0": seed0, "seed=1": seed1}})
    combined = next(goal for goal in table.index.get_level_values("goal") if goal.startswith("#32 with #31"))
    replaced = table.loc[(combined, "recovered-7-streamline-gptq or pruned-7-streamline-gptq")]  # one row, both seeds
    assert replaced["points"] == 2 and replaced["score ratio (mean)"] == pytest.approx((0.95 + 0.88) / 2)
    assert replaced["lowest point's ratio"] == pytest.approx(0.88)
    assert replaced["bytes ratio"] == pytest.approx((0.30 + 0.31) / 2) and replaced["decode ratio"] == pytest.approx((30.5 / 30 + 33 / 30) / 2)
    assert not replaced["meets the goal"]  # 0.915× the score: under 0.92×, though seed 0 alone would pass
    only_seed0 = goals_table({"table 4": {"Pruning and SFT": "recovered-7"}, "points": {"seed=0": seed0}})
    assert only_seed0.loc[(combined, "recovered-7-streamline-gptq or pruned-7-streamline-gptq"), "meets the goal"]
    assert not table.loc[(combined, "recovered-7-gptq"), "meets the goal"]  # 0.85× and 0.90×


def test_the_time_goals_sum_each_points_stages_and_compare_the_mean_with_the_budget():
    fast = {stage: 100.0 for stage in ("01_finetune", "02_layer_importance", "03_prune", "04_sft_pruned", "05_quantize", "06_benchmark")}
    record = {"points": {"seed=0": {"stage seconds": {**fast, "07_judge": 50.0, "08_beyond": 400.0}},  # 650 s and 400 s
                         "seed=1": {"stage seconds": {**fast, "07_judge": 1000.0, "08_beyond": 700.0}},  # 1,600 s and 700 s
                         "seed=2": {"stage seconds": {**fast, "07_judge": None, "08_beyond": 100.0}}}}  # 07 not timed: no 01-07 sum
    table = time_budget_table(record)
    assert table.loc["seed=0", "01-07 seconds"] == 650.0 and table.loc["seed=1", "01-07 seconds"] == 1600.0
    assert pd.isna(table.loc["seed=2", "01-07 seconds"])
    assert table.loc["mean", "01-07 seconds"] == pytest.approx(1125.0) and table.loc["mean", "08 seconds"] == pytest.approx(400.0)
    assert time_budget_verdicts(table).splitlines() == [
        "- 01-07 within 20 min (1,200 s): **met**: 1,125 s on average over 2 points (0.94× the budget), the fastest 650 s",
        "- 08 within 8 min (480 s): **met**: 400 s on average over 3 points (0.83× the budget), the fastest 100 s"]
    record["points"]["seed=2"]["stage seconds"]["08_beyond"] = 500.0  # mean 533 s
    assert "08 within 8 min (480 s): **not met**: 533 s" in time_budget_verdicts(time_budget_table(record))
    assert time_budget_verdicts(time_budget_table({"points": {"a": {}}})).startswith("- 01-07 within 20 min: **not measured**")
