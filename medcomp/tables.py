"""The paper's Tables 1-5 on this run: which registered variant plays which of the paper's rows, the
measured tables 03-06 show, and the scored tables 07 shows, each with the paper's values beside ours.

Rows map by fraction of depth: our level at 7/32 of the depth is the paper's 7-of-32 row, whatever our
depth. The paper's numbers come from ``medcomp.paper``; this run's from its registry and stage results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from medcomp.benchmark import PAPER_MODEL, paper_model_bytes_per_token
from medcomp.pruning import levels_for_depth, prunable_layers
from medcomp.scoring import VariantScore


# Which of our levels stands for which of the paper's Table 2 rows, and why (shown in 04).
PAPER_ROW_BY_LAYERS_OF_32 = {7: "Pruned LLaVA (5.6 B)", 9: "Pruned LLaVA (5.2 B)"}


NOT_IN_THE_PAPER = "—"


def _table(rows: Sequence[dict[str, Any]], index: str) -> pd.DataFrame:
    """The frame a report shows: one row per dict, indexed by ``index``. A cell a row has no value for
    (a paper column beside a variant the paper never built: QLoRA deployment, the magnitude baseline;
    RTN beside a model quantized by AWQ and bitsandbytes only) reads "—", not pandas' NaN."""
    rows = list(rows)
    if not rows:
        return pd.DataFrame(columns=[index]).set_index(index)
    frame = pd.DataFrame(rows).set_index(index)
    missing = frame.columns[frame.isna().any()]  # columns without a gap keep their dtype
    frame[missing] = frame[missing].astype(object).where(frame[missing].notna(), NOT_IN_THE_PAPER)
    return frame


def paper_layers_of_32(fraction: float | None) -> int | None:
    """The paper's layer count (of 32) for a pruning level given as a fraction of the depth."""
    return None if fraction is None else round(fraction * 32)


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
    beyond: tuple[tuple[str, str], ...]  # (this package's 4-bit model that keeps the finetune, variant): 08's, scored in 07
    finetuned: str
    first_pruned: str | None
    first_recovered: str | None


def paper_rows(variants: dict[str, Any], pruning_levels: Sequence[tuple[float, int]]) -> PaperRows:
    """Map this run's registry onto the paper's tables. ``pruning_levels`` are 03's (fraction, count)
    pairs (``pruning.levels_for_depth``)."""
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
               ("Prune + Quant", f"{pruned}-awq"), ("Prune + SFT + Quant", f"{first}-awq")]
    beyond = [("Quantization Only, GPTQ (08)", "finetuned-gptq"), ("Prune + SFT + Quant, GPTQ (08)", f"{first}-gptq"),
              ("Quantization Only, QA-LoRA folded into 4 bits (08)", "finetuned-awq-qalora"), ("Quantization Only, LoRA on the 4-bit grid (08)", "finetuned-awq-lora"),
              ("QLoRA deployment: nf4 base + unmerged adapter (08)", "finetuned-qlora"),
              ("Prune + SFT + Quant, QA-LoRA folded into 4 bits (08)", f"{first}-awq-qalora"), ("Prune + SFT + Quant, LoRA on the 4-bit grid (08)", f"{first}-awq-lora"),
              ("Prune + SFT, QLoRA deployment (08)", f"{first}-qlora"),
              ("Iterative pruning (SLEB) and SFT (08)", f"{first}-sleb"), ("Block replacement (LLM-Streamline) and SFT (08)", f"{first}-streamline"),
              ("Block replacement, GPTQ (08)", f"{pruned}-streamline-gptq"), ("Block replacement and SFT, GPTQ (08)", f"{first}-streamline-gptq"),
              ("Pruning and distillation (08)", f"{first}-kd"), ("Pruning and half distillation, half SFT (08)", f"{first}-kd50"),
              ("Prune + SFT + Quant, distilled into 4 bits, QA-LoRA (08)", f"{first}-awq-qalora-kd")]
    beyond += [(f"Prune + {m.upper()} + SFT on the 4-bit model (08)", f"{pruned}-{m}-sft") for m in ("awq", "rtn")]
    table_5 = [("Full pipeline (ours)", f"{first}-awq"), ("Bitsandbytes quantization", f"{first}-bnb"),
               *[("Pruning Based on Magnitude Baseline", f"{v.name}-awq") for v in magnitude[:1]],
               ("Round to neighbour Quantization", f"{first}-rtn")]
    present = lambda rows: tuple((label, name) for label, name in rows if name in variants)  # noqa: E731
    return PaperRows(table_1, table_2, table_3, present(table_4), present(table_5), present(beyond), "finetuned", pruned, first)


def paper_rows_for_run(run, params) -> PaperRows:
    """``paper_rows`` for a run: 03's levels recomputed for the finetuned model's depth, as 03 and 04 map them."""
    from transformers import AutoConfig


    variants = run.variants()
    if "finetuned" not in variants:
        raise ValueError(f"no 'finetuned' variant in {run.registry_path}: run 01_finetune first")
    rankings = run.stage_dir("02_layer_importance") / "rankings.json"  # read, so the model's folder need not be there
    num_layers = (json.loads(rankings.read_text())["num_layers"] if rankings.exists()
                  else AutoConfig.from_pretrained(variants["finetuned"].path).text_config.num_hidden_layers)
    max_removable = len(prunable_layers(num_layers, params.importance.protect_first, params.importance.protect_last))
    levels = levels_for_depth(params.pruning.levels, num_layers, max_removable)
    return paper_rows(variants, levels)


# ------------------------------------------------------------------------------------------ measured tables (03-06)


def table_1(results: Sequence[dict[str, Any]], paper_table: pd.DataFrame, dtype: str) -> pd.DataFrame:
    """The paper's Table 1 with this run's columns beside it, level by level (same fraction of depth)."""
    base = next(r for r in results if r["layers removed"] == 0)
    rows = []
    for index, result in enumerate(r for r in results if r["ranking"] != "magnitude"):
        paper_row = paper_table.iloc[index] if index < len(paper_table) else None
        rows.append(_table_1_row(result, base, dtype, paper_row))
    for result in (r for r in results if r["ranking"] == "magnitude"):
        rows.append(_table_1_row(result, base, dtype, None))
    return _table(rows, "variant")


def _table_1_row(result, base, dtype, paper_row) -> dict[str, Any]:
    row = {
        "variant": result["variant"] + (" (magnitude ranking)" if result["ranking"] == "magnitude" else ""),
        "layers removed": result["layers removed"],
        "compression ratio (%)": round(100 * (1 - result["parameters"] / base["parameters"]), 1),
        "parameters (M)": round(result["parameters"] / 1e6, 1),
        f"model memory (MB, {dtype})": round(result["model bytes"] / 1e6, 1),
        "naming accuracy": f"{result['naming accuracy']:.1%}",
        "mean answer tokens": round(result["mean answer tokens"], 1),
        "answers never stopping": f"{result['never stopped']:.0%}",
        "score (07_judge)": "see 07",
    }
    if paper_row is not None:
        row |= {"paper: layers removed (of 32)": int(paper_row["layers removed"]), "paper: compression (%)": paper_row["compression ratio (%)"],
                "paper: parameters (B)": paper_row["parameters (B)"], "paper: score": paper_row["performance score"], "paper: VRAM (GB)": paper_row["VRAM (GB)"]}
    return row


def table_2(results: Sequence[dict[str, Any]], paper_table: pd.DataFrame, num_layers: int) -> pd.DataFrame:
    """The paper's Table 2 with this run's rows beside it. Rows map by the level's fraction of depth,
    as 03 maps levels: ours at 9/32 of the depth sits beside the paper's 9-of-32 row whatever our depth."""
    rows = []
    for result in results:
        paper_name = PAPER_ROW_BY_LAYERS_OF_32.get(paper_layers_of_32(result.get("fraction")))
        paper_row = paper_table.loc[paper_name] if paper_name in paper_table.index else None
        row = {
            "variant": result["variant"],
            "layers removed": f"{result['layers removed']} of {num_layers}",
            "parameters (M)": round(result["parameters"] / 1e6, 1),
            "SFT time": f"{result['SFT seconds'] / 60:.1f} min ({result['SFT steps']} steps)",
            "SFT peak RAM (GiB)": result.get("SFT peak RAM (GiB)"),
            "naming before SFT": f"{result['naming before SFT']:.1%}",
            "naming after SFT": f"{result['naming after SFT']:.1%}",
            "never stopping before → after": f"{result['never stopped before SFT']:.0%} → {result['never stopped after SFT']:.0%}",
            "score before → after (07_judge)": "see 07",
            "paper row": paper_name or ("— (Table 5 baseline)" if result.get("fraction") is None else "—"),
        }
        if "SFT peak GPU memory (GiB)" in result:
            row["SFT peak GPU memory (GiB)"] = result["SFT peak GPU memory (GiB)"]
        if paper_row is not None:
            row |= {f"paper: {column}": value for column, value in paper_row.items()}
        rows.append(row)
    return _table(rows, "variant")


def _paper_model_row(result: dict[str, Any]) -> str | None:
    """Table 3's row for one of our models: the unpruned one, or a recovered level by its fraction of depth."""
    if result["source"] == "finetuned":
        return "Base LLaVA (7B)"
    return {7: "Pruned LLaVA (5.6B)", 9: "Pruned LLaVA (5.2B)"}.get(paper_layers_of_32(result.get("fraction")))


def table_3(results: Sequence[dict[str, Any]], paper_table: pd.DataFrame, reference_bytes: dict[str, int]) -> pd.DataFrame:
    """Each model × method: held-out naming, decoder and whole-model memory (and their ratio to the
    unquantized finetuned model), quantization wall time; the paper's scores and VRAM beside."""
    cells = [r for r in results if r["role"] in ("finetuned", "recovered") and r["method"] in ("awq", "bnb", "rtn")]
    methods = [m for m in ("awq", "bnb", "rtn") if any(r["method"] == m for r in cells)]
    measures = {
        "naming": lambda r: f"{r['naming accuracy']:.1%}",
        "decoder MB": lambda r: f"{r['decoder bytes'] / 1e6:.1f} ({r['decoder bytes'] / reference_bytes['decoder']:.2f}×)",
        "model MB": lambda r: f"{r['model bytes'] / 1e6:.1f} ({r['model bytes'] / reference_bytes['model']:.2f}×)",
        "quantize (s)": lambda r: round(r["quantize seconds"], 1),
    }
    rows = []
    for source in dict.fromkeys(r["source"] for r in cells):
        by_method = {r["method"]: r for r in cells if r["source"] == source}
        row: dict[str, Any] = {"model": source}
        for measure, show in measures.items():
            row |= {f"{measure} {m}": show(by_method[m]) if m in by_method else "—" for m in methods}
        paper_name = _paper_model_row(next(iter(by_method.values())))
        row["paper row"] = paper_name or "—"
        if paper_name in paper_table.index:
            row |= {f"paper: {k}": v for k, v in paper_table.loc[paper_name].items()}
        rows.append(row)
    return _table(rows, "model")


def table_4(rows: Sequence[tuple[str, dict[str, Any]]], paper_table: pd.DataFrame, reference_bytes: dict[str, int]) -> pd.DataFrame:
    """The paper's overall comparison: ``rows`` are (paper method, this run's measurements) pairs;
    methods the paper does not have (this project's orders that keep the finetune) get no paper columns."""
    table = []
    for method, r in rows:
        row = {"method": method, "variant": r["variant"], "parameters (M)": round(r["parameters"] / 1e6, 1), "bit width": r["bits"],
               "naming accuracy": f"{r['naming accuracy']:.1%}", "answers never stopping": f"{r['never stopped']:.0%}",
               "decoder MB": f"{r['decoder bytes'] / 1e6:.1f} ({r['decoder bytes'] / reference_bytes['decoder']:.2f}×)",
               "model MB": f"{r['model bytes'] / 1e6:.1f} ({r['model bytes'] / reference_bytes['model']:.2f}×)",
               "score, latency, peak memory": "see 06 and 07"}
        if method in paper_table.index:
            row |= {f"paper: {k}": v for k, v in paper_table.loc[method].items()}
        table.append(row)
    return _table(table, "method")


def table_5(rows: Sequence[tuple[str, str]], results_by_name: dict[str, dict[str, Any]], paper_table: pd.DataFrame) -> pd.DataFrame:
    """Table 5's ablations of the pipeline as 05 measured them: naming and answers never stopping,
    beside the paper's score and notes; scores come in 07."""
    return _table([{"setting": setting, "variant": name, "naming accuracy": f"{results_by_name[name]['naming accuracy']:.1%}",
                    "answers never stopping": f"{results_by_name[name]['never stopped']:.0%}", "score (07_judge)": "see 07",
                    "paper: score": paper_table.loc[setting, "score"], "paper: notes": paper_table.loc[setting, "notes"]}
                   for setting, name in rows if name in results_by_name], "setting")


def survival_summary(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per quantized variant of an SFT'd model: what of the SFT's weight change survived (medians over
    the decoder linears compared), and held-out naming."""
    rows = []
    for r in results:
        frame = r.get("survival")
        if frame is None or frame.empty:
            continue
        rows.append({"variant": r["variant"], "method": r["method"], "linears compared": len(frame),
                     "kept (median)": round(float(frame["kept"].median()), 3), "cosine (median)": round(float(frame["cosine"].median()), 3),
                     "delta / 4-bit step (median)": round(float(frame["delta / step"].median()), 3),
                     "entries below half a step": f"{frame['below half a step'].mean():.1%}",
                     "naming accuracy": f"{r['naming accuracy']:.1%}"})
    return _table(rows, "variant")


def table_4_efficiency(rows: Sequence[tuple[str, str]], table, paper_table):
    """Table 4's efficiency columns: each paper method's variant on this run (``scoring.PaperRows.table_4``),
    ours as absolute and × the original, beside the paper's latency and VRAM and their own ratios."""
    original = paper_table.loc["Original LLaVA"]
    out = []
    for method, name in rows:
        if name not in table.index:
            continue
        r = table.loc[name]
        row = {"method": method, "variant": name, "parameters (M)": r["parameters (M)"], "bit width": r["bits"],
               "model MB": f"{r['model MB']:.1f} ({r['model MB × finetuned']:.2f}×)",
               "peak memory during generation MB": f"{r['peak memory during generation MB']:.0f} ({r['peak memory × finetuned']:.2f}×)",
               "prefill ms": f"{r['prefill ms']:.1f} ({r['prefill × finetuned']:.2f}×)",
               "decode ms/token": f"{r['decode ms/token']:.2f} ({r['decode × finetuned']:.2f}×)"}
        if method in paper_table.index:
            p = paper_table.loc[method]
            row |= {"paper: parameters (B)": p["parameters (B)"], "paper: bit width": p["bit width"],
                    "paper: latency ms/token": f"{p['latency (ms/token)']} ({p['latency (ms/token)'] / original['latency (ms/token)']:.2f}×)",
                    "paper: VRAM GB": f"{p['VRAM (GB)']} ({p['VRAM (GB)'] / original['VRAM (GB)']:.2f}×)"}
        out.append(row)
    return _table(out, "method")


def paper_bandwidth_bounds(paper_table, bandwidth_gb_s: float = 320.0, group_size: int = 64):
    """What the paper's T4 latencies would be if decoding only had to read the weights once per token:
    LLaVA-1.5-7B's language model at its Table 4 bit widths, the layers removed read off its parameter
    count (7.06B unpruned, 0.20B a layer: its "5.85B" is 6 layers), against the latency the paper measured."""
    m = PAPER_MODEL
    per_layer_billions = (4 * m["hidden"] ** 2 + 3 * m["hidden"] * m["intermediate"]) / 1e9
    unpruned = paper_table["parameters (B)"].max()
    rows = []
    for method, p in paper_table.iterrows():
        removed = round((unpruned - p["parameters (B)"]) / per_layer_billions)
        needed = paper_model_bytes_per_token(removed, int(p["bit width"]), group_size)
        bound = 1000 * needed / (bandwidth_gb_s * 1e9)
        rows.append({"method": method, "layers": 32 - removed, "bit width": int(p["bit width"]), "weights read per token GB": round(needed / 1e9, 2),
                     "bandwidth bound ms/token": round(bound, 1), "paper: measured ms/token": p["latency (ms/token)"],
                     "measured ÷ bound": round(p["latency (ms/token)"] / bound, 1)})
    return _table(rows, "method")


# ------------------------------------------------------------------------------------------ scored tables (07)


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
    return _table(table, "variant")


def scored_table_2(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame) -> pd.DataFrame:
    table = []
    for label, pruned, recovered in rows.table_2:
        paper = paper_table.loc[label] if label in paper_table.index else None
        row: dict[str, Any] = {"model": label, "before SFT": pruned, "after SFT": recovered}
        _paper_beside(row, scores.get(pruned), None if paper is None else float(paper["score before SFT"]), "before:")
        _paper_beside(row, scores.get(recovered), None if paper is None else float(paper["score after SFT"]), "after:")
        table.append(row)
    return _table(table, "model")


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
    return _table(table, "model")


def scored_table_4(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame,
                   efficiency: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 4 scored, with 06's efficiency columns (ratios to the finetuned model) when given; 08's models that
    keep the finetune below the paper's rows."""
    table = []
    for method, name in [*rows.table_4, *rows.beyond]:
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
    return _table(table, "method")


def scored_table_5(rows: PaperRows, scores: dict[str, VariantScore], paper_table: pd.DataFrame) -> pd.DataFrame:
    table = []
    for setting, name in rows.table_5:
        row: dict[str, Any] = {"setting": setting, "variant": name}
        _paper_beside(row, scores.get(name), float(paper_table.loc[setting, "score"]))
        row["paper: notes"] = paper_table.loc[setting, "notes"]
        table.append(row)
    return _table(table, "setting")


def relabel(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """Rename this run's score columns (not the paper's) to ``label``, e.g. "proxy score"."""
    if label == "score":
        return frame
    return frame.rename(columns=lambda c: c if c.startswith("paper") or "paper:" in c else c.replace("score", label))


def scored_tables(rows: PaperRows, scores: dict[str, VariantScore], variants: dict[str, Any], efficiency: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """The paper's Tables 1-5 with this run's scores (and 06's efficiency in Table 4), by title."""
    from medcomp import paper

    return {
        "Table 1 · pruning levels": scored_table_1(rows, scores, paper.TABLE_1, variants),
        "Table 2 · before and after the recovery SFT": scored_table_2(rows, scores, paper.TABLE_2),
        "Table 3 · AWQ against bitsandbytes (and RTN)": scored_table_3(rows, scores, paper.TABLE_3),
        "Table 4 · overall": scored_table_4(rows, scores, paper.TABLE_4, efficiency),
        "Table 5 · ablations of the full pipeline": scored_table_5(rows, scores, paper.TABLE_5),
    }

