"""HTML fragments for the run's index page (the numbers come from ``tables`` and ``claims``)."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from medcomp.claims import ONE_SEED_NOTE


def headline_html(table_4: pd.DataFrame, verdict_table: pd.DataFrame, ratios: dict[str, Any], world: str, score_label: str) -> str:
    """The run's index page opens with this: Table 4 in short, ours beside the paper's, and the verdicts."""
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
            f"<h3>The paper's claims on this run (one seed)</h3>{verdict_table.to_html(escape=True)}"
            f"<p>{html.escape(ONE_SEED_NOTE.replace('**', ''))}</p></div>")
