"""06_benchmark: which variants to measure, and what the measurements say about memory and time."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from medcomp.runs import Run, Variant
from medcomp.stages.materialise import ensure_for_serving


def variants_to_measure(run: Run, names: Sequence[str] | None) -> list[Variant]:
    """The registered variants ``names`` lists (all when empty), in that order, their folders present
    (rebuilt from their recipe where missing); an unknown name is an error listing the registered ones."""
    registered = run.variants()
    names = list(names or registered)
    unknown = sorted(set(names) - set(registered))
    if unknown:
        raise ValueError(f"benchmark.variants names unregistered variants {unknown}; registered: {sorted(registered)}")
    return [ensure_for_serving(run, registered[name]) for name in names]


def memory_notes(table: pd.DataFrame, variants: dict[str, Variant]) -> str:
    """Markdown notes on variants whose first generation or resident memory stands out, and why."""
    one_time = table.index[table["first generation peak MB"] > 1.3 * table["peak memory during generation MB"]]
    above = table.index[table["resident MB"] > 1.5 * table["model MB"]]
    notes = []
    if len(one_time):
        notes.append(f"First generation well above later ones (one-time work on first use, such as a 4-bit kernel repacking its weights): "
                     f"{', '.join(f'`{n}`' for n in one_time)}.")
    for name in above:
        r = table.loc[name]
        notes.append(f"`{name}` is resident with {r['resident MB']:.0f} MB for {r['model MB']:.0f} MB of tensors, {r['of which mapped files MB']:.0f} MB "
                     "of it pages of mapped checkpoint files" + (": the QLoRA deployment maps its full-precision base checkpoint to quantize it "
                     "at load, pages the OS may drop." if variants[name].extra.get("format") == "qlora" else "."))
    return "\n\n".join(notes) or "No variant's first generation stands out, and every variant is resident close to its tensors' size."


def decode_split_findings(table: pd.DataFrame, pipeline: str | None) -> str:
    """Markdown: where a decoded token's time goes for the finetuned model, the pipeline model and the
    4-bit finetuned models."""
    base = table.loc["finetuned"]
    lines = [f"On this run the finetuned model spends **{base['layers ms/token']:.1f} ms** of a decoded token in its {int(base['layers'])} "
             f"decoder layers ({base['ms per layer']:.2f} ms a layer), **{base['lm_head ms/token']:.1f} ms** in the lm_head "
             f"(kept in full precision: {base['weights read per token MB'] - base['decoder MB']:.0f} MB) and **{base['rest ms/token']:.1f} ms** elsewhere (`generate`'s per-step work, sampling, cache)."]
    for name in [n for n in (pipeline, "finetuned-awq", "finetuned-bnb") if n in table.index]:
        r = table.loc[name]
        lines.append(f"- `{name}`: {r['ms per layer']:.2f} ms a layer over {int(r['layers'])} layers, lm_head {r['lm_head ms/token']:.1f} ms, "
                     f"rest {r['rest ms/token']:.1f} ms: decode **{r['decode × finetuned']:.2f}×** the finetuned model's.")
    lines.append("Only the decoder layers shrink with pruning and 4-bit weights; the lm_head and the per-step overhead do not, "
                 "so they set a floor under every variant's ratio.")
    return "\n".join(lines)


def summary(table: pd.DataFrame, pipeline: str | None, threads: int) -> dict[str, Any]:
    """06's key figures for the index: the finetuned model's decode time and the pipeline model's ratios."""
    base = table.loc["finetuned"]
    final_name = pipeline if pipeline in table.index else None
    result = {"variants measured": len(table), "threads": threads, "finetuned decode ms/token": round(float(base["decode ms/token"]), 2)}
    if final_name:
        result |= {f"{final_name} decode × finetuned": round(float(table.loc[final_name, "decode × finetuned"]), 2),
                   f"{final_name} model MB × finetuned": round(float(table.loc[final_name, "model MB × finetuned"]), 2),
                   f"{final_name} peak memory × finetuned": round(float(table.loc[final_name, "peak memory × finetuned"]), 2)}
    return result
