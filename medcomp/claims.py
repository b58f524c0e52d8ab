"""The paper's claims as paired comparisons between this run's variants, and a verdict on each.

A claim *holds* when the paired bootstrap interval of the score difference lies above 0, *does not
hold* when below, and is *within noise* when it contains 0 (``scoring.paired_difference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from medcomp.paper import TABLE_4
from medcomp.scoring import VariantScore, paired_difference
from medcomp.tables import PaperRows


@dataclass(frozen=True)
class Claim:
    claim: str
    better: str  # the variant the paper says scores higher
    worse: str
    paper: str  # the paper's own numbers for the comparison
    factor: float = 1.0  # "better keeps at least factor × worse's score": worse's ratings scaled by it


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


def beyond_claims(rows: PaperRows, variants: dict[str, Any], keep: float = 0.95) -> list[Claim]:
    """This package's own claims for 08's models (issue 31), tested like the paper's: QA-LoRA beats the paper's
    4-bit model of the same source at the same bytes, and keeps ``keep`` × the unquantized model's score."""
    claims = []
    for source, paper_name in (("finetuned", "Quantization Only"), (rows.first_recovered, "Prune + SFT + Quant")):
        folded = f"{source}-awq-qalora"
        claims += [Claim(f"(this package) QA-LoRA folded into 4 bits beats the paper's {paper_name} at the same bytes ({folded} vs {source}-awq)",
                         folded, f"{source}-awq", "not in the paper: its 4-bit models merge, then round"),
                   Claim(f"(this package) QA-LoRA folded into 4 bits keeps ≥ {keep:.0%} of the unquantized model's score ({folded} vs {source})",
                         folded, source or "", f"the paper's {paper_name} keeps {_paper_ratio(paper_name):.2f}× of its source", keep)]
    first = rows.first_recovered
    claims += [Claim(f"(this package) distillation beats SFT recovery ({first}{suffix} vs {first})", f"{first}{suffix}", first or "",
                     "not in the paper; Minitron found distillation better than SFT") for suffix in ("-kd", "-kd50")]
    claims.append(Claim(f"(this package) iterative removal (SLEB) beats the one-shot ranking after the same SFT ({first}-sleb vs {first})",
                        f"{first}-sleb", first or "", "not in the paper, which ranks once"))
    claims.append(Claim(f"(this package) one trained block in place of a run (LLM-Streamline) beats removing the blocks, after the same SFT "
                        f"({first}-streamline vs {first})",
                        f"{first}-streamline", first or "", "not in the paper; LLM-Streamline reports it above LoRA recovery at the same ratio"))
    claims.append(Claim(f"(this package) distilled into 4 bits keeps ≥ {keep:.0%} of the unquantized pipeline model's score ({first}-awq-qalora-kd vs {first})",
                        f"{first}-awq-qalora-kd", first or "", f"the paper's Prune + SFT + Quant keeps {_paper_ratio('Prune + SFT + Quant'):.2f}× of its Pruning and SFT", keep))
    return [c for c in claims if c.better in variants and c.worse in variants]


def _paper_ratio(method: str) -> float:
    source = {"Quantization Only": "Original LLaVA", "Prune + SFT + Quant": "Pruning and SFT"}[method]
    return float(TABLE_4.loc[method, "score"] / TABLE_4.loc[source, "score"])


def verdicts(claims: Sequence[Claim], scores: dict[str, VariantScore], samples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per claim whose variants are scored; a claim with ``factor`` f compares better's ratings with f × worse's."""
    rows = []
    for claim in claims:
        better, worse = scores.get(claim.better), scores.get(claim.worse)
        if better is None or worse is None:
            continue
        comparison = paired_difference(better.ratings, {k: claim.factor * v for k, v in worse.ratings.items()}, samples, seed)
        scaled = f"{claim.factor:g} × " if claim.factor != 1.0 else ""
        rows.append({"claim": claim.claim, "ours": f"{better.score:.1f} ({claim.better}) vs {scaled}{worse.score:.1f} ({claim.worse})",
                     "difference [95% CI]": f"{comparison.difference:+.1f} [{comparison.low:+.1f}, {comparison.high:+.1f}]",
                     "paired items": comparison.items, "verdict": comparison.verdict, "paper": claim.paper})
    return pd.DataFrame(rows).set_index("claim") if rows else pd.DataFrame(columns=["claim"]).set_index("claim")


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


def verdict_lines(verdict_table: pd.DataFrame, score_label: str) -> str:
    """The verdicts as Markdown bullets, each with our numbers and the paper's."""
    lines = [f"- **{claim}**: {r['verdict']} on this run ({score_label}s {r['ours']}; difference {r['difference [95% CI]']}). "
             f"Paper: {r['paper']}." for claim, r in verdict_table.iterrows()]
    return "\n".join(lines + ["", ONE_SEED_NOTE])


ONE_SEED_NOTE = ("These verdicts are **one seed's**: their intervals cover the test items, not the randomness of training. "
                 "`python -m medcomp sweep PARAMS --set seed=0,1,2` reruns the pipeline per seed and counts each verdict over the seeds.")
