"""Statistics of judge ratings: scores with bootstrap intervals, paired differences, judge agreement.

Which variant plays which row of the paper is ``medcomp.tables``; the paper's claims and their verdicts
are ``medcomp.claims``.

**Score.** The paper scales "the average results into percentage-based scores" without a formula. We
use ``score = 100 * mean rating / 4``: its Table 5 gives the unintelligible round-to-nearest model 25
and Table 4 gives Prune + Quant 25.00, exactly a mean rating of 1 under this formula (the alternative,
``100 * (mean - 1) / 3``, would give 0). The alternative is shown once, in 07's score table.

**Uncertainty.** 117 items are few: every score carries a 95 % percentile bootstrap interval over
items, and every comparison a paired bootstrap interval of the difference over the items both variants
have valid ratings for. A claim *holds* when that interval lies above 0, *does not hold* when below,
and is *within noise* when it contains 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import pandas as pd

from medcomp.judging import Judgement, JudgeItem


def score(ratings: Sequence[int] | np.ndarray) -> float:
    """The paper's performance score: the mean 1-4 rating as a percentage of the top rating."""
    values = np.asarray(ratings, dtype=float)
    return float(100 * values.mean() / 4) if values.size else float("nan")


def score_from_zero(ratings: Sequence[int] | np.ndarray) -> float:
    """The other plausible scaling, 1 -> 0 and 4 -> 100."""
    values = np.asarray(ratings, dtype=float)
    return float(100 * (values.mean() - 1) / 3) if values.size else float("nan")


def bootstrap_ci(ratings: Sequence[int] | np.ndarray, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``score`` over items resampled with replacement."""
    values = np.asarray(ratings, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    low, high = np.quantile(100 * means / 4, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    difference: float  # score of a minus score of b, on the items both have
    low: float
    high: float
    items: int

    @property
    def verdict(self) -> str:
        if not self.items:
            return "not measured"
        if self.low > 0:
            return "holds"
        if self.high < 0:
            return "does not hold"
        return "within noise"


def paired_difference(a: dict[str, int], b: dict[str, int], samples: int = 2000, seed: int = 0, level: float = 0.95) -> Comparison:
    """Score of ``a`` minus score of ``b`` (ratings by item key) with a paired bootstrap interval."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return Comparison(float("nan"), float("nan"), float("nan"), 0)
    differences = np.array([a[k] - b[k] for k in shared], dtype=float)
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(shared), size=(samples, len(shared)))].mean(axis=1)
    low, high = np.quantile(100 * means / 4, [(1 - level) / 2, (1 + level) / 2])
    return Comparison(float(100 * differences.mean() / 4), float(low), float(high), len(shared))


def agreement(a: dict[str, int], b: dict[str, int]) -> dict[str, Any]:
    """How far two judges agree on the items both rated: Spearman's rho and Cohen's kappa with
    quadratic weights (a 1-vs-4 disagreement costs nine times a 1-vs-2 one)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    shared = sorted(set(a) & set(b))
    x, y = [a[k] for k in shared], [b[k] for k in shared]
    if len(shared) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"items": len(shared), "spearman": float("nan"), "weighted kappa": float("nan"), "exact agreement": float("nan")}
    return {"items": len(shared), "spearman": float(spearmanr(x, y).statistic),
            "weighted kappa": float(cohen_kappa_score(x, y, weights="quadratic", labels=[1, 2, 3, 4])),
            "exact agreement": float(np.mean(np.array(x) == np.array(y)))}


@dataclass
class VariantScore:
    variant: str
    ratings: dict[str, int]  # item key -> rating, valid items only
    invalid: int
    failed: int
    problems: dict[str, int]
    samples: int = 2000
    seed: int = 0

    @cached_property
    def score(self) -> float:
        return score(list(self.ratings.values()))

    @cached_property
    def ci(self) -> tuple[float, float]:
        return bootstrap_ci(list(self.ratings.values()), self.samples, self.seed)

    def shown(self) -> str:
        low, high = self.ci
        return f"{self.score:.1f} [{low:.1f}, {high:.1f}]" if self.ratings else "—"


def variant_score(variant: str, items: Sequence[JudgeItem], judgements: Sequence[Judgement], samples: int = 2000, seed: int = 0) -> VariantScore:
    problems: dict[str, int] = {}
    for judgement in judgements:
        if judgement.status != "valid":
            problems[judgement.problem or judgement.status] = problems.get(judgement.problem or judgement.status, 0) + 1
    return VariantScore(variant, {item.key: j.rating for item, j in zip(items, judgements) if j.status == "valid" and j.rating is not None},
                        sum(j.status == "invalid" for j in judgements), sum(j.status == "failed" for j in judgements), problems, samples, seed)


def score_variants(judged: dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]], samples: int = 2000, seed: int = 0) -> dict[str, VariantScore]:
    """Every judged variant's score, with its bootstrap interval drawn from ``seed``."""
    return {name: variant_score(name, items, judgements, samples, seed) for name, (items, judgements) in judged.items()}


def score_table(scores: dict[str, VariantScore], stages: dict[str, str]) -> pd.DataFrame:
    """One row per variant: valid/invalid/failed items, mean rating, score with its interval, and the
    score under the other scaling."""
    rows = []
    for name, s in scores.items():
        values = list(s.ratings.values())
        low, high = s.ci
        rows.append({"variant": name, "stage": stages.get(name, ""), "valid": len(values), "invalid": s.invalid, "failed": s.failed,
                     "mean rating": round(float(np.mean(values)), 3) if values else float("nan"),
                     "score": round(s.score, 2), "95% CI low": round(low, 2), "95% CI high": round(high, 2),
                     "score as 100·(mean−1)/3": round(score_from_zero(values), 2),
                     "why invalid": "; ".join(f"{k}: {v}" for k, v in s.problems.items())})
    return pd.DataFrame(rows).set_index("variant")


def pareto_front(points: pd.DataFrame, cost: str, value: str) -> pd.Index:
    """Rows no other row beats on both: lower or equal ``cost`` with a strictly higher ``value``, or
    strictly lower ``cost`` with an equal or higher ``value``."""
    front = []
    for name, row in points.iterrows():
        dominated = ((points[cost] <= row[cost]) & (points[value] > row[value])) | ((points[cost] < row[cost]) & (points[value] >= row[value]))
        if not dominated.any():
            front.append(name)
    return pd.Index(front)


def case_answers(judged: dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]], stages: dict[str, str], index: int) -> dict[str, tuple[str, int | None]]:
    """Figure 5's panels: for each (label, variant), the variant's answer to item ``index`` and its rating."""
    panels = {}
    for label, name in stages.items():
        if name in judged:
            items, judgements = judged[name]
            panels[f"{label} ({name})"] = (items[index].answer, judgements[index].rating)
    return panels


def scores_by_question(judged: dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]]) -> pd.DataFrame:
    """Score per variant and question kind (the disease's name, its features, its treatment): which
    kind of answer a compression step costs."""
    rows: dict[str, dict[str, list[int]]] = {}
    for name, (items, judgements) in judged.items():
        for item, judgement in zip(items, judgements):
            if judgement.status == "valid" and judgement.rating is not None:
                rows.setdefault(name, {}).setdefault(item.question_kind, []).append(judgement.rating)
    return pd.DataFrame({name: {kind: round(score(ratings), 1) for kind, ratings in kinds.items()} for name, kinds in rows.items()}).T


def frontier_points(scores_table: pd.DataFrame, efficiency: pd.DataFrame, stages: dict[str, str], finetuned: str = "finetuned") -> pd.DataFrame:
    """Every scored and measured variant as ratios to ``finetuned``: score (with its interval), model bytes and
    decode ms/token; ``stage`` says who built it (08's are this package's). The paper's Table 4 rows as ratios to
    its own original model, its VRAM standing for bytes (it reports no tensor bytes)."""
    points = scores_table[["score", "95% CI low", "95% CI high"]].join(efficiency[["model MB × finetuned", "decode × finetuned"]], how="inner")
    base = float(scores_table.loc[finetuned, "score"])
    points = points.assign(**{"score × finetuned": points["score"] / base, "low": points["95% CI low"] / base, "high": points["95% CI high"] / base,
                              "stage": [stages.get(name, "") for name in points.index]})
    return points[["score × finetuned", "low", "high", "model MB × finetuned", "decode × finetuned", "stage"]]


def paper_frontier(paper_table: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 4 as ratios to its "Original LLaVA": score, VRAM (for bytes) and latency."""
    original = paper_table.loc["Original LLaVA"]
    return pd.DataFrame({"score × finetuned": paper_table["score"] / original["score"], "model MB × finetuned": paper_table["VRAM (GB)"] / original["VRAM (GB)"],
                         "decode × finetuned": paper_table["latency (ms/token)"] / original["latency (ms/token)"]})
