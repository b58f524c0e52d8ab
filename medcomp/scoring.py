"""From judgements to the paper's tables: scores with confidence intervals, which variant plays which
row of the paper, the scored Tables 1-5, judge agreement, and a verdict on each of the paper's claims.

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


# ------------------------------------------------------------------------------------------ scores per variant


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


# ------------------------------------------------------------------------------------------ the paper's rows


@dataclass(frozen=True)
class PaperRows:
    """Which registered variant stands for which row of the paper's tables on this run.

    Pruning levels map by fraction of depth (ours at 7/32 of the depth is the paper's 7-of-32 row,
    whatever our depth); the first recovery level is the paper's pipeline model ("5.85B"/"5.6B").
    """

    table_1: tuple[tuple[int, str], ...]  # (paper's layers removed of 32, variant)
    table_2: tuple[tuple[str, str, str], ...]  # (paper model or our label, pruned variant, recovered variant)
    table_3: tuple[tuple[str, str], ...]  # (paper model, source variant); cells are <source>-awq / -bnb / -rtn
    table_4: tuple[tuple[str, str], ...]  # (paper method or ours, variant)
    table_5: tuple[tuple[str, str], ...]  # (paper setting, variant)
    finetuned: str
    first_pruned: str | None
    first_recovered: str | None


def paper_rows(variants: dict[str, Any], pruning_levels: Sequence[tuple[float, int]], quantize_then_recover: Sequence[str] = ()) -> PaperRows:
    """Map this run's registry onto the paper's tables. ``pruning_levels`` are 03's (fraction, count)
    pairs (``pruning.levels_for_depth``)."""
    from medcomp.recovery import PAPER_ROW_BY_LAYERS_OF_32, paper_layers_of_32

    table_1 = tuple((paper_layers_of_32(fraction), "finetuned" if count == 0 else f"pruned-{count}") for fraction, count in pruning_levels)
    table_1 = tuple((layers, name) for layers, name in table_1 if name in variants)
    recovered = sorted((v for v in variants.values() if v.stage == "04_sft_pruned" and "fraction" in v.extra),
                       key=lambda v: (v.extra["fraction"] is None, v.extra["fraction"] or 0))
    by_depth = [v for v in recovered if v.extra["fraction"] is not None]
    magnitude = [v for v in recovered if v.extra["fraction"] is None]
    table_2 = tuple((PAPER_ROW_BY_LAYERS_OF_32.get(paper_layers_of_32(v.extra["fraction"]), f"{v.name} (no paper row)"), v.parent, v.name)
                    for v in by_depth) + tuple(("magnitude baseline (Table 5)", v.parent, v.name) for v in magnitude)
    table_3 = (("Base LLaVA (7B)", "finetuned"),) + tuple(
        (PAPER_ROW_BY_LAYERS_OF_32[paper_layers_of_32(v.extra["fraction"])].replace(" B)", "B)"), v.name)
        for v in by_depth if paper_layers_of_32(v.extra["fraction"]) in PAPER_ROW_BY_LAYERS_OF_32)
    first = by_depth[0].name if by_depth else None
    pruned = by_depth[0].parent if by_depth else None
    table_4 = [("Original LLaVA", "finetuned"), ("Pruning Only", pruned), ("Pruning and SFT", first), ("Quantization Only", "finetuned-awq"),
               ("Prune + Quant", f"{pruned}-awq"), ("Prune + SFT + Quant", f"{first}-awq"),
               ("QLoRA deployment: nf4 base + unmerged adapter (ours)", "finetuned-qlora"),
               ("Prune + SFT, QLoRA deployment (ours)", f"{first}-qlora"),
               *[(f"Prune + {m.upper()} + SFT on the 4-bit model (ours)", f"{pruned}-{m}-sft") for m in quantize_then_recover]]
    table_5 = [("Full pipeline (ours)", f"{first}-awq"), ("Bitsandbytes quantization", f"{first}-bnb"),
               *[("Pruning Based on Magnitude Baseline", f"{v.name}-awq") for v in magnitude[:1]],
               ("Round to neighbour Quantization", f"{first}-rtn")]
    present = lambda rows: tuple((label, name) for label, name in rows if name in variants)  # noqa: E731
    return PaperRows(table_1, table_2, table_3, present(table_4), present(table_5), "finetuned", pruned, first)


# ------------------------------------------------------------------------------------------ scored tables


def _paper_beside(row: dict[str, Any], ours: VariantScore | None, paper_score: float | None, label: str = "") -> dict[str, Any]:
    prefix = f"{label} " if label else ""
    row[f"{prefix}score [95% CI]"] = ours.shown() if ours else "—"
    row[f"{prefix}paper: score"] = paper_score if paper_score is not None else "—"
    row[f"{prefix}ours − paper"] = round(ours.score - paper_score, 1) if ours and ours.ratings and paper_score is not None else "—"
    return row


def scored_table_1(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame, variants: dict[str, Any]) -> pd.DataFrame:
    table = []
    paper_by_layers = paper_table.set_index("layers removed")
    for layers, name in rows.table_1:
        paper = paper_by_layers.loc[layers] if layers in paper_by_layers.index else None
        row = {"variant": name, "layers removed": len(variants[name].layers_removed), "paper: layers removed (of 32)": layers,
               "parameters (M)": round((variants[name].parameters or 0) / 1e6, 1)}
        table.append(_paper_beside(row, scores.get(name), None if paper is None else float(paper["performance score"])))
    return pd.DataFrame(table).set_index("variant")


def scored_table_2(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame) -> pd.DataFrame:
    table = []
    for label, pruned, recovered in rows.table_2:
        paper = paper_table.loc[label] if label in paper_table.index else None
        row: dict[str, Any] = {"model": label, "before SFT": pruned, "after SFT": recovered}
        _paper_beside(row, scores.get(pruned), None if paper is None else float(paper["score before SFT"]), "before:")
        _paper_beside(row, scores.get(recovered), None if paper is None else float(paper["score after SFT"]), "after:")
        table.append(row)
    return pd.DataFrame(table).set_index("model")


def scored_table_3(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame) -> pd.DataFrame:
    table = []
    for label, source in rows.table_3:
        paper = paper_table.loc[label] if label in paper_table.index else None
        row: dict[str, Any] = {"model": label, "variant": source}
        for method, column in (("awq", "score AWQ"), ("bnb", "score bitsandbytes"), ("rtn", None)):
            name = f"{source}-{method}"
            if column is None and name not in scores:
                continue
            _paper_beside(row, scores.get(name), None if paper is None or column is None else float(paper[column]), method.upper() + ":")
        table.append(row)
    return pd.DataFrame(table).set_index("model").fillna("—")


def scored_table_4(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame,
                   efficiency: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 4 scored, with 06's efficiency columns (ratios to the finetuned model) when given."""
    table = []
    for method, name in rows.table_4:
        paper = paper_table.loc[method] if method in paper_table.index else None
        row: dict[str, Any] = {"method": method, "variant": name}
        _paper_beside(row, scores.get(name), None if paper is None else float(paper["score"]))
        if efficiency is not None and name in efficiency.index:
            e = efficiency.loc[name]
            row |= {"parameters (M)": e["parameters (M)"], "bit width": e["bits"],
                    "model MB (× finetuned)": f"{e['model MB']:.1f} ({e['model MB × finetuned']:.2f}×)",
                    "decode ms/token (× finetuned)": f"{e['decode ms/token']:.1f} ({e['decode × finetuned']:.2f}×)",
                    "peak memory during generation MB": round(float(e["peak memory during generation MB"]), 0)}
        if paper is not None:
            row |= {"paper: parameters (B)": paper["parameters (B)"], "paper: bit width": paper["bit width"],
                    "paper: latency (ms/token)": paper["latency (ms/token)"], "paper: VRAM (GB)": paper["VRAM (GB)"]}
        table.append(row)
    return pd.DataFrame(table).set_index("method")


def scored_table_5(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame) -> pd.DataFrame:
    table = []
    for setting, name in rows.table_5:
        row: dict[str, Any] = {"setting": setting, "variant": name}
        _paper_beside(row, scores.get(name), float(paper_table.loc[setting, "score"]))
        row["paper: notes"] = paper_table.loc[setting, "notes"]
        table.append(row)
    return pd.DataFrame(table).set_index("setting")


# ------------------------------------------------------------------------------------------ the paper's claims


@dataclass(frozen=True)
class Claim:
    claim: str
    better: str  # the variant the paper says scores higher
    worse: str
    paper: str  # the paper's own numbers for the comparison


def paper_claims(rows: PaperRows, variants: dict[str, Any]) -> list[Claim]:
    """The paper's claims as pairwise comparisons between this run's variants (those registered)."""
    deepest = rows.table_1[-1][1] if rows.table_1 else None
    first, pruned = rows.first_recovered, rows.first_pruned
    magnitude = next((name for setting, name in rows.table_5 if setting.startswith("Pruning Based on Magnitude")), None)
    claims = [
        Claim(f"pruning degrades with depth: the unpruned model beats the deepest level ({deepest})", "finetuned", deepest or "",
              "Table 1: 80.12 (0 of 32 removed) → 27.25 (10 of 32)"),
        Claim(f"SFT recovers a pruned model ({pruned} → {first})", first or "", pruned or "", "Table 2: 62.50 → 74.25"),
        Claim("AWQ beats bitsandbytes after pruning and SFT", f"{first}-awq", f"{first}-bnb", "Table 3/5: 54.25 vs 47.25 (47)"),
        Claim("AWQ beats round-to-nearest after pruning and SFT", f"{first}-awq", f"{first}-rtn", "Table 5: 54.25 vs 25"),
        Claim("the similarity ranking beats the magnitude ranking (both recovered and AWQ-quantized)", f"{first}-awq", magnitude or "",
              "Table 5: 54.25 vs 50"),
        Claim("the full pipeline beats prune + quantize without SFT", f"{first}-awq", f"{pruned}-awq", "Table 4: 54.25 vs 25.00"),
    ]
    return [c for c in claims if c.better in variants and c.worse in variants]


def verdicts(claims: Sequence[Claim], scores: dict[str, VariantScore], samples: int = 2000, seed: int = 0) -> pd.DataFrame:
    rows = []
    for claim in claims:
        better, worse = scores.get(claim.better), scores.get(claim.worse)
        if better is None or worse is None:
            continue
        comparison = paired_difference(better.ratings, worse.ratings, samples, seed)
        rows.append({"claim": claim.claim, "ours": f"{better.score:.1f} ({claim.better}) vs {worse.score:.1f} ({claim.worse})",
                     "difference [95% CI]": f"{comparison.difference:+.1f} [{comparison.low:+.1f}, {comparison.high:+.1f}]",
                     "paired items": comparison.items, "verdict": comparison.verdict, "paper": claim.paper})
    return pd.DataFrame(rows).set_index("claim") if rows else pd.DataFrame(columns=["claim"]).set_index("claim")


def pareto_front(points: pd.DataFrame, cost: str, value: str) -> pd.Index:
    """Rows no other row beats on both: lower or equal ``cost`` with a strictly higher ``value``, or
    strictly lower ``cost`` with an equal or higher ``value``."""
    front = []
    for name, row in points.iterrows():
        dominated = ((points[cost] <= row[cost]) & (points[value] > row[value])) | ((points[cost] < row[cost]) & (points[value] >= row[value]))
        if not dominated.any():
            front.append(name)
    return pd.Index(front)


def paper_rows_for_run(run, params) -> PaperRows:
    """``paper_rows`` for a run: 03's levels recomputed for the finetuned model's depth, as 03 and 04 map them."""
    from transformers import AutoConfig

    from medcomp.pruning import levels_for_depth, prunable_layers

    variants = run.variants()
    if "finetuned" not in variants:
        raise ValueError(f"no 'finetuned' variant in {run.registry_path}: run 01_finetune first")
    num_layers = AutoConfig.from_pretrained(variants["finetuned"].path).text_config.num_hidden_layers
    max_removable = len(prunable_layers(num_layers, params.importance.protect_first, params.importance.protect_last))
    levels = levels_for_depth(params.pruning.levels, num_layers, max_removable)
    return paper_rows(variants, levels, params.quantization.quantize_then_recover)


def relabel(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """Rename this run's score columns (not the paper's) to ``label``, e.g. "proxy score"."""
    if label == "score":
        return frame
    return frame.rename(columns=lambda c: c if c.startswith("paper") or "paper:" in c else c.replace("score", label))


def case_answers(judged: dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]], stages: dict[str, str], index: int) -> dict[str, tuple[str, int | None]]:
    """Figure 5's panels: for each (label, variant), the variant's answer to item ``index`` and its rating."""
    panels = {}
    for label, name in stages.items():
        if name in judged:
            items, judgements = judged[name]
            panels[f"{label} ({name})"] = (items[index].answer, judgements[index].rating)
    return panels


def final_ratios(rows: PaperRows, scores: dict[str, VariantScore], efficiency: pd.DataFrame | None) -> dict[str, float]:
    """The paper's pipeline model ("Prune + SFT + Quant") against the finetuned model: memory, decode
    latency and score, each as a ratio."""
    final = dict(rows.table_4).get("Prune + SFT + Quant")
    if final is None or final not in scores or rows.finetuned not in scores:
        return {}
    ratios = {"variant": final, "score × finetuned": scores[final].score / scores[rows.finetuned].score}
    if efficiency is not None and final in efficiency.index:
        ratios |= {"model MB × finetuned": float(efficiency.loc[final, "model MB × finetuned"]),
                   "peak memory × finetuned": float(efficiency.loc[final, "peak memory × finetuned"]),
                   "decode ms/token × finetuned": float(efficiency.loc[final, "decode × finetuned"])}
    return ratios


def headline_html(table_4: pd.DataFrame, verdict_table: pd.DataFrame, ratios: dict[str, Any], world: str, score_label: str) -> str:
    """The run's index page opens with this: Table 4 in short, ours beside the paper's, and the verdicts."""
    import html

    keep = [c for c in table_4.columns if c in ("variant", "model MB (× finetuned)", "decode ms/token (× finetuned)", "paper: VRAM (GB)",
                                                "paper: latency (ms/token)") or "score" in c]
    caution = ("Embedded world: a 135M-parameter LLaVA on synthetic images, judged by the offline proxy judge. These are an honest "
               "small model's results, not the paper's; compare directions and ratios, not numbers."
               if world == "embedded" else f"Scores: {score_label}.")
    final = ""
    if ratios:
        parts = [f"{k} <b>{v:.2f}</b>" for k, v in ratios.items() if k != "variant"]
        final = f"<p>The pipeline model <code>{html.escape(ratios['variant'])}</code> against the finetuned model: {', '.join(parts)}.</p>"
    return (f'<div class="headline"><h2>Headline</h2><p><b>{html.escape(caution)}</b></p>{final}'
            f"<h3>Table 4 in short</h3>{table_4[keep].to_html(escape=True)}"
            f"<h3>The paper's claims on this run</h3>{verdict_table.to_html(escape=True)}</div>")


def scores_by_question(judged: dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]]) -> pd.DataFrame:
    """Score per variant and question kind (the disease's name, its features, its treatment): which
    kind of answer a compression step costs."""
    rows: dict[str, dict[str, list[int]]] = {}
    for name, (items, judgements) in judged.items():
        for item, judgement in zip(items, judgements):
            if judgement.status == "valid" and judgement.rating is not None:
                rows.setdefault(name, {}).setdefault(item.question_kind, []).append(judgement.rating)
    return pd.DataFrame({name: {kind: round(score(ratings), 1) for kind, ratings in kinds.items()} for name, kinds in rows.items()}).T
