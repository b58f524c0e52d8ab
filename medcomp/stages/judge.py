"""07_judge: judge every variant's answers, score them, compare judges, and sum the run up."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from medcomp.judging import Judgement, JudgeItem, JudgementCache, other_judges
from medcomp.scoring import VariantScore, agreement

Judged = dict[str, tuple[Sequence[JudgeItem], Sequence[Judgement]]]


def agreement_table(judged: Judged, cache: JudgementCache, identity: str) -> pd.DataFrame | None:
    """This judge's valid ratings against every other judge's in the cache on the same items
    (Spearman, quadratic-weighted kappa); None when no other judge has rated them."""
    current = {f"{item.variant}|{item.key}": j.rating for name, (items, judgements) in judged.items()
               for item, j in zip(items, judgements) if j.status == "valid"}
    all_items = [item for items, _ in judged.values() for item in items]
    others = other_judges(cache, identity, all_items)
    if not others:
        return None
    return pd.DataFrame([{"other judge": other, **agreement(current, ratings)} for other, ratings in others.items()]).set_index("other judge")


def incomplete_reason(judged: Judged) -> str | None:
    """Why 07 is unfinished when any answer could not be judged (the judge unreachable, timing out or
    erring), with counts and causes; None when every answer has a judgement, valid or invalid."""
    causes: dict[str, int] = {}
    total = 0
    for items, judgements in judged.values():
        total += len(judgements)
        for judgement in judgements:
            if judgement.status == "failed":
                causes[judgement.problem or "unknown"] = causes.get(judgement.problem or "unknown", 0) + 1
    if not causes:
        return None
    return (f"{sum(causes.values())} of {total} answers could not be judged ({'; '.join(f'{c}: {n}' for c, n in causes.items())}); "
            "a plain rerun retries exactly these")


def summary(identity: str, table: pd.DataFrame, scores: dict[str, VariantScore], shown: Sequence[str], ratios: dict[str, Any],
            verdict_table: pd.DataFrame, score_label: str) -> dict[str, Any]:
    """07's key figures for the index: counts, the scores of ``shown`` variants, the pipeline's ratios, the verdicts."""
    result: dict[str, Any] = {"judge": identity.split("|")[0], "answers judged": int(table["valid"].sum()), "invalid": int(table["invalid"].sum()),
                              "failed": int(table["failed"].sum())}
    result |= {f"{score_label} {name}": scores[name].shown() for name in shown if name in scores}
    result |= {k: (round(v, 2) if isinstance(v, float) else v) for k, v in ratios.items()}
    result |= {f"verdict: {claim}": r["verdict"] for claim, r in verdict_table.iterrows()}
    return result
