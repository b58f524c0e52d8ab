"""The goals issues 31 and 32 set for 08's models, checked over a sweep's points (``results.sweep_results``).

Each goal names its candidates in advance (methods, not models picked by their test scores), the model its
scores are a ratio to, and its thresholds. Every candidate present is listed with each check, so a reader sees
how far each method is from the goal; the goal is met by the candidates that pass every check. Ratios are
taken within a point (a seed) and then averaged, so that a seed's own difficulty cancels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from medcomp.runs import RUN_ORDER

BEYOND_STAGES = ("08_beyond",)
PAPER_STAGES = tuple(stage for stage in RUN_ORDER if stage not in BEYOND_STAGES)
# issue 31's time goals for `make report` on the embedded default: the paper's notebooks, then 08 on its own
TIME_BUDGETS = {"01-07": (PAPER_STAGES, 20 * 60.0), "08": (BEYOND_STAGES, 8 * 60.0)}
FOUR_BIT_METHODS = ("gptq", "awq-qalora", "rtn-qalora", "awq-lora", "rtn-lora", "qlora", "awq", "rtn", "bnb")


@dataclass(frozen=True)
class Goal:
    name: str
    reference: str  # each candidate's score is a ratio to this variant's, point by point
    # a variant name, or a tuple of names: one method whose variant a point names by a choice made on validation
    # (prune, replace, GPTQ takes the replaced model with or without SFT), read at each point as whichever it built
    candidates: tuple[str | tuple[str, ...], ...]
    min_mean_ratio: float
    min_point_ratio: float | None = None
    bytes_reference: str | None = None  # model bytes at most max_bytes_ratio × this variant's
    max_bytes_ratio: float | None = None
    decode_reference: str | None = None  # decode time at most max_decode_ratio × this variant's, in the same run
    max_decode_ratio: float | None = None
    training_reference: str | None = None  # recovery time at most max_training_ratio × this variant's
    max_training_ratio: float | None = None

    def describe(self) -> str:
        """The goal's name and thresholds, as the tables' index shows it."""
        terms = [f"score ≥ {self.min_mean_ratio}× {self.reference}'s (mean)"]
        terms += [f"no point below {self.min_point_ratio}×"] if self.min_point_ratio is not None else []
        terms += [f"{what} ≤ {limit}× {reference}'s" for what, reference, limit in (
            ("bytes", self.bytes_reference, self.max_bytes_ratio), ("decode", self.decode_reference, self.max_decode_ratio),
            ("training time", self.training_reference, self.max_training_ratio)) if limit is not None]
        return f"{self.name} ({'; '.join(terms)})"


def issue_goals(first_recovered: str) -> list[Goal]:
    """The goals as the issues state them (embedded default, seeds 0-4), for the run's pipeline model."""
    pruned = first_recovered.replace("recovered-", "pruned-", 1)
    pipeline = tuple(f"{first_recovered}-{m}" for m in (*FOUR_BIT_METHODS, "awq-qalora-kd"))
    return [
        Goal("#31: a 4-bit finetuned model that keeps the finetune", "finetuned", tuple(f"finetuned-{m}" for m in FOUR_BIT_METHODS), 0.97,
             bytes_reference="finetuned", max_bytes_ratio=0.35, decode_reference="finetuned-awq", max_decode_ratio=1.05),
        Goal(f"#31: a 4-bit {first_recovered} that keeps its score", first_recovered, pipeline, 0.97, 0.90,
             bytes_reference=f"{first_recovered}-awq", max_bytes_ratio=1.02, decode_reference=f"{first_recovered}-awq", max_decode_ratio=1.05),
        Goal("#32: a recovery of the pruned model that loses less", "finetuned",
             (*[f"{first_recovered}{s}" for s in ("", "-kd", "-kd50", "-sleb", "-streamline")],
              f"{pruned}-streamline"), 0.95, 0.90,  # the replaced block alone, no SFT
             training_reference=first_recovered, max_training_ratio=1.5),
        Goal("#32 with #31: a deployable 4-bit pruned model", "finetuned",
             (*pipeline, tuple(f"{name}-streamline-gptq" for name in (first_recovered, pruned))), 0.92,  # prune, replace, GPTQ
             bytes_reference="finetuned", max_bytes_ratio=0.35, decode_reference=f"{first_recovered}-awq", max_decode_ratio=1.05),
    ]


def _training_seconds(point: dict[str, Any], variant: str) -> float | None:
    seconds = point.get("training seconds") or {}
    if variant not in seconds:
        return None
    built = variant.replace("recovered-", "pruned-", 1)  # a replaced block's training counts towards its recovery
    return seconds[variant] + (seconds.get(built, 0.0) if built != variant and built.endswith("-streamline") else 0.0)


def candidate_label(candidate: str | tuple[str, ...]) -> str:
    """A candidate as the tables show it: its name, or a method's names joined by " or "."""
    return candidate if isinstance(candidate, str) else " or ".join(candidate)


def _built(point: dict[str, Any], candidate: str | tuple[str, ...]) -> str | None:
    """The variant of ``candidate`` that ``point`` scored: the name, or the first of a method's names it has."""
    names = (candidate,) if isinstance(candidate, str) else candidate
    return next((name for name in names if name in (point.get("scores") or {})), None)


def _mean_ratio(points: list[dict[str, Any]], read, candidate: str | tuple[str, ...], reference: str | None) -> float | None:
    ratios = [read(p, name) / read(p, reference) for p in points
              if reference and (name := _built(p, candidate)) and read(p, name) is not None and read(p, reference)]
    return sum(ratios) / len(ratios) if ratios else None


def goals_table(record: dict[str, Any], goals: list[Goal] | None = None) -> pd.DataFrame:
    """One row per (goal, candidate) present in the sweep record: its points, mean score, score ratios (mean and
    lowest point), bytes, decode and training-time ratios, and whether it meets the goal."""
    points = list((record.get("points") or {}).values())
    first = (record.get("table 4") or {}).get("Pruning and SFT") or "recovered-7"
    score = lambda p, v: (p.get("scores") or {}).get(v)  # noqa: E731
    size = lambda p, v: ((p.get("efficiency") or {}).get(v) or {}).get("model bytes")  # noqa: E731
    decode = lambda p, v: ((p.get("efficiency") or {}).get(v) or {}).get("decode ms/token")  # noqa: E731
    rows = []
    for goal in goals if goals is not None else issue_goals(first):
        for candidate in goal.candidates:
            paired = [(score(p, name), score(p, goal.reference)) for p in points
                      if (name := _built(p, candidate)) and score(p, name) is not None and score(p, goal.reference)]
            if not paired:
                continue
            ratios = [c / r for c, r in paired]
            row = {"goal": goal.describe(), "candidate": candidate_label(candidate), "points": len(paired), "mean score": sum(c for c, _ in paired) / len(paired),
                   "score ratio (mean)": sum(ratios) / len(ratios), "lowest point's ratio": min(ratios)}
            failed = [f"score {row['score ratio (mean)']:.3f}× < {goal.min_mean_ratio}×"] if row["score ratio (mean)"] < goal.min_mean_ratio else []
            if goal.min_point_ratio is not None and min(ratios) < goal.min_point_ratio:
                failed.append(f"a point at {min(ratios):.3f}× < {goal.min_point_ratio}×")
            for label, read, reference, limit in (("bytes ratio", size, goal.bytes_reference, goal.max_bytes_ratio),
                                                  ("decode ratio", decode, goal.decode_reference, goal.max_decode_ratio),
                                                  ("training-time ratio", _training_seconds, goal.training_reference, goal.max_training_ratio)):
                ratio = _mean_ratio(points, read, candidate, reference) if limit is not None else None
                row[label] = ratio
                if limit is not None and (ratio is None or ratio > limit):
                    failed.append(f"{label.removesuffix(' ratio').replace('-', ' ')} {'not measured' if ratio is None else f'{ratio:.3f}×'} > {limit}×")
            row["meets the goal"], row["fails"] = not failed, "; ".join(failed) or "—"
            rows.append(row)
    return pd.DataFrame(rows).set_index(["goal", "candidate"]) if rows else pd.DataFrame()


def goal_verdicts(table: pd.DataFrame) -> dict[str, str]:
    """Per goal, in words: the candidates that meet it, or that none does, which comes closest in score, and the
    checks that one fails."""
    verdicts = {}
    for goal, rows in table.groupby(level="goal", sort=False):
        met = [candidate for (_, candidate), ok in rows["meets the goal"].items() if ok]
        ratio = rows["score ratio (mean)"]
        best = ratio.idxmax()[1]
        verdicts[goal] = (f"met by {', '.join(f'`{c}`' for c in met)}" if met else
                          f"not met; the highest score ratio is `{best}`'s, {ratio.max():.2f}× over {int(rows.loc[(goal, best), 'points'])} points, "
                          f"which fails: {rows.loc[(goal, best), 'fails']}")
    return verdicts


def verdicts_markdown(table: pd.DataFrame) -> str:
    """``goal_verdicts`` as a Markdown list."""
    return "\n".join(f"- {goal}: **{verdict}**" for goal, verdict in goal_verdicts(table).items())


def time_budget_table(record: dict[str, Any]) -> pd.DataFrame:
    """Each point's seconds per stage, as its manifest recorded them (a reused stage keeps the seconds of the run
    that built it), and the sums that issue 31's time goals bound (``TIME_BUDGETS``); the last row is the mean.

    A sweep's points share one bootstrap (the embedded data and base model are built once), so these are the
    stages' own times, not `make report`'s from an empty cache, and they carry whatever else ran on the machine.
    """
    rows = {}
    for name, point in (record.get("points") or {}).items():
        if not (seconds := point.get("stage seconds") or {}):
            continue  # a transcribed point, or one that never ran
        rows[name] = {**seconds, **{f"{label} seconds": sum(seconds[s] for s in stages) if all(seconds.get(s) is not None for s in stages) else None
                                    for label, (stages, _) in TIME_BUDGETS.items()}}
    table = pd.DataFrame(rows).T.astype(float)
    return pd.concat([table, table.mean().to_frame("mean").T]) if not table.empty else table


def time_budget_verdicts(table: pd.DataFrame) -> str:
    """Per time goal, in words: its budget, the mean and the fastest point against it, and whether it is met."""
    lines = []
    for label, (_, budget) in TIME_BUDGETS.items():
        column = table.get(f"{label} seconds")
        per_point = column.drop("mean").dropna() if column is not None else pd.Series(dtype=float)
        if per_point.empty:
            lines.append(f"- {label} within {budget / 60:.0f} min: **not measured** in this sweep")
            continue
        mean, fastest = per_point.mean(), per_point.min()
        verdict = "met" if mean <= budget else "not met"
        lines.append(f"- {label} within {budget / 60:.0f} min ({budget:,.0f} s): **{verdict}**: {mean:,.0f} s on average over "
                     f"{len(per_point)} point{'s' * (len(per_point) > 1)} ({mean / budget:.2f}× the budget), the fastest {fastest:,.0f} s")
    return "\n".join(lines)
