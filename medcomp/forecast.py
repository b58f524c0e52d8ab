"""The run's forecast on the index page, before any stage runs: ``medcomp.plan``'s T4 memory and time plan per
stage, and the disk each stage writes against what a Kaggle session keeps (``disk_plan``)."""

from __future__ import annotations

from medcomp.plan import (GIB, KAGGLE_OUTPUT_GIB, T4_BUDGET_GIB, T4_SECONDS_PER_TOKEN, ModelShape, lora_parameters, plans_table, shape_for_params,
                          stage_plans, weight_bytes)
from medcomp.pruning import levels_for_depth, prunable_layers


def disk_plan(params, shape: ModelShape) -> list[tuple[str, str, int, str]]:
    """(stage, what it writes, bytes, where): every checkpoint a run writes, as 01-05 write them. Model
    folders go to the run folder, or to ``runtime.scratch_dir`` when set (03 then drops each pruned
    copy once it has answered: a recipe rebuilds it); adapters and Trainer checkpoints stay in the run."""
    models = "scratch" if params.runtime.scratch_dir else "run folder"
    from medcomp.pruning import levels_for_depth, prunable_layers

    removable = len(prunable_layers(shape.layers, params.importance.protect_first, params.importance.protect_last))
    levels = [count for _, count in levels_for_depth(params.pruning.levels, shape.layers, removable) if count]
    recovered = [count for _, count in levels_for_depth(params.recovery.levels, shape.layers, removable)]
    magnitude = dict(levels_for_depth(params.pruning.levels, shape.layers, removable)).get(params.pruning.magnitude_level, 0)
    adapter = lambda settings, removed=0: 4 * lora_parameters(shape, settings.lora.r, settings.lora.target_modules, removed)  # noqa: E731
    checkpoint = lambda settings, removed=0: 3 * adapter(settings, removed)  # noqa: E731  adapter + AdamW's two moments
    rows = [("01_finetune", "adapter + one Trainer checkpoint", adapter(params.finetune) + checkpoint(params.finetune), "run folder"),
            ("01_finetune", "merged model (fp16)", weight_bytes(shape), models)]
    pruned = [(f"pruned-{count}", count) for count in levels] + ([(f"pruned-{magnitude}-magnitude", magnitude)] if magnitude else [])
    if params.runtime.scratch_dir:  # one pruned copy at a time; 04 rebuilds those it recovers, one at a time too
        rows.append(("03_prune", "one pruned copy at a time (fp16)", max(weight_bytes(shape, layers_removed=c) for _, c in pruned), models))
    else:
        rows += [("03_prune", f"{name} (fp16 copy)", weight_bytes(shape, layers_removed=count), models) for name, count in pruned]
    for count in recovered + ([magnitude] if params.recovery.magnitude and magnitude else []):
        rows.append(("04_sft_pruned", f"recovered from {count} removed: adapter + checkpoint", adapter(params.recovery.finetune, count)
                     + checkpoint(params.recovery.finetune, count), "run folder"))
        rows.append(("04_sft_pruned", f"recovered from {count} removed: merged (fp16)", weight_bytes(shape, layers_removed=count), models))
    if params.runtime.scratch_dir and recovered:  # each pruned parent rebuilt, recovered, dropped: one at a time
        rows.append(("04_sft_pruned", "one pruned parent at a time (fp16)", weight_bytes(shape, layers_removed=min(recovered)), models))
    q = params.quantization
    cells = [(m, 0) for m in q.finetuned] + [(m, recovered[0] if recovered else 0) for m in (*q.pruned, *params.beyond.quantize_then_recover) if recovered]
    cells += [(m, count) for count in recovered for m in q.recovered] + [(m, recovered[0]) for m in q.pipeline_ablations if recovered]
    cells += [(m, magnitude) for m in q.recovered_magnitude if magnitude and params.recovery.magnitude]
    rows += [("05_quantize", f"{method} 4-bit, {count} removed", weight_bytes(shape, 4, count, q.group_size, method="nf4" if method == "bnb" else method), models)
             for method, count in dict.fromkeys(cells)]
    b = params.beyond  # int4 with float offsets: AWQ's bytes (an fp32 offset per group in place of a packed zero: within 1 %)
    rows += [("08_beyond", f"{method}{'' if method == 'GPTQ' else f' on the {b.grid} grid'}, {count} removed (int4)", weight_bytes(shape, 4, count, q.group_size, method="awq")
              + (adapter(b.recipe or params.recovery.finetune, count) if method == "LoRA" else 0), models)
             for method, wanted in (("GPTQ", b.gptq), ("QA-LoRA", b.qalora), ("LoRA", b.lora_on_grid)) if wanted for count in [0, *recovered[:1]]]
    return rows


def disk_table(params, shape: ModelShape, limit_gib: float = KAGGLE_OUTPUT_GIB):
    """``disk_plan`` per stage, with the running total against Kaggle's output limit."""
    import pandas as pd

    frame = pd.DataFrame(disk_plan(params, shape), columns=["stage", "written", "bytes", "where"])
    table = frame.pivot_table(index="stage", columns="where", values="bytes", aggfunc="sum", fill_value=0, sort=False) / GIB
    for where in ("run folder", "scratch"):
        if where not in table:
            table[where] = 0.0
    table = table[["run folder", "scratch"]].rename(columns=lambda c: f"{c} GiB")
    table["run folder cumulative GiB"] = table["run folder GiB"].cumsum()
    table[f"run folder within {limit_gib} GiB"] = table["run folder cumulative GiB"] <= limit_gib
    return table.round(2)


def forecast_html(params) -> str:
    """The index page's forecast, computed before any stage runs: the T4 memory and time plan per stage
    and the disk the run folder will need ('' when the model's config is not known before the run)."""
    import html

    shape = shape_for_params(params)
    if shape is None:
        return ""
    plans = stage_plans(params, shape)
    hours = sum(p.seconds for p in plans) / 3600
    disk = disk_table(params, shape)
    return (f'<div class="forecast"><h2>Forecast for {"a Kaggle T4" if params.model.gpus == 1 else f"{params.model.gpus} Kaggle T4s"} (computed before the run, from {html.escape(params.model.id)}\'s config)</h2>'
            f"<p>Every stage's planned peak against {T4_BUDGET_GIB} GiB a GPU, and T4 hours estimated from the paper's own rates "
            f"({T4_SECONDS_PER_TOKEN * 1000:.0f} ms/token; Table 2's 2 h 42 min SFT epoch): about <b>{hours:.1f} h</b> in all. "
            f"Estimates, not measurements; 06 measures the real peaks on a GPU.</p>"
            f"{plans_table(plans).to_html(escape=True)}<h3>Disk</h3><p>The run folder's checkpoints, stage by stage, "
            f"against the {KAGGLE_OUTPUT_GIB} GiB a Kaggle session keeps in /kaggle/working.</p>{disk.to_html(escape=True)}</div>")
