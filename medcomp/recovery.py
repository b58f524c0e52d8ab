"""Recovery SFT of pruned models (paper section 3.3, Table 2).

The pruned models of ``03_prune`` are finetuned again with QLoRA (paper: r=16, alpha=8) on the same
training conversations, then merged like 01's model. Each recovered model is registered as a variant
whose parent is its pruned model, with its answers to the held-out test set. A model already recovered
from the current pruned checkpoint with the same settings and data is read back, so an interrupted
stage resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from medcomp.files import atomic_write_json, content_hash
from medcomp.models import checkpoint_identity, count_parameters, load_llava, load_processor
from medcomp.params import FinetuneParams, RecoveryParams
from medcomp.pruning import levels_for_depth
from medcomp.runs import Run, Variant

if TYPE_CHECKING:
    import pandas as pd

RECORD = "recovery.json"


@dataclass(frozen=True)
class RecoveryStep:
    pruned: str  # the pruned variant (03)
    recovered: str  # the variant this stage registers
    fraction: float | None  # the level as a fraction of the depth; None for the magnitude baseline


def recovery_plan(settings: RecoveryParams, pruning_levels: Sequence[float], num_layers: int, max_removable: int,
                  registered: Sequence[str]) -> list[RecoveryStep]:
    """Which pruned variants to recover: ``settings.levels`` mapped onto this depth as 03 maps them,
    plus 03's magnitude-pruned model. A level 03 did not build is an error naming the levels it did."""
    counts = dict(levels_for_depth(sorted(set(pruning_levels) | set(settings.levels)), num_layers, max_removable))
    steps = []
    for level in settings.levels:
        name = f"pruned-{counts[level]}" if level in counts else None
        if name is None or name not in registered:
            built = sorted(v for v in registered if v.startswith("pruned-"))
            raise ValueError(f"recovery level {level:.4f} ({name or 'beyond the removable layers'}) was not built by 03_prune; "
                             f"built: {built}. Add the level to pruning.levels or choose one of those.")
        steps.append(RecoveryStep(name, name.replace("pruned-", "recovered-", 1), level))
    if settings.magnitude:
        magnitude = [v for v in registered if v.startswith("pruned-") and v.endswith("-magnitude")]
        steps += [RecoveryStep(name, name.replace("pruned-", "recovered-", 1), None) for name in magnitude]
    return steps


def _setup(pruned_path: str, params: FinetuneParams, train_examples, seed: int) -> dict[str, Any]:
    return {"source_identity": [list(i) for i in checkpoint_identity(pruned_path)], "finetune": params.model_dump(mode="json"),
            "data": content_hash([(e.image, e.question, e.reference) for e in train_examples], 16), "seed": seed}


def recover(run: Run, stage: str, step: RecoveryStep, train_examples, test_examples, params: FinetuneParams, dtype: str,
            device: str, max_new_tokens: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """QLoRA-finetune the pruned variant, merge, reload, answer the test set, register; or read it back."""
    from medcomp.evaluation import PeakMemory, answer_stats, generate_answers
    from medcomp.training import finetune

    pruned = run.variant(step.pruned)
    output_dir = run.stage_dir(stage) / step.recovered
    setup = _setup(pruned.path, params, train_examples, seed)
    record_path = output_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record["setup"] == setup and step.recovered in run.variants() and run.has_answers(step.recovered):
        return {**record["result"], "reused": True}

    with PeakMemory() as peak:
        result = finetune(pruned.path, dtype, device, train_examples, params, output_dir, seed=seed)
    started = time.perf_counter()
    model = load_llava(str(result.merged_dir), dtype=dtype, device=device)
    variant = Variant(name=step.recovered, stage=stage, path=str(result.merged_dir), parent=pruned.name,
                      layers_removed=pruned.layers_removed, bits=pruned.bits, parameters=count_parameters(model),
                      notes=f"QLoRA SFT (r={params.lora.r}, alpha={params.lora.alpha}) of {pruned.name}",
                      extra={"adapter": str(result.adapter_dir), "sft_base": pruned.path, "fraction": step.fraction})
    run.register_variant(variant)
    answers = generate_answers(model, load_processor(str(result.merged_dir)), test_examples, max_new_tokens, batch_size,
                               description=f"answering ({step.recovered})")
    run.save_answers(step.recovered, answers)
    before = answer_stats(run.answers(step.pruned))
    after = answer_stats(answers)
    summary = {"variant": step.recovered, "pruned": step.pruned, "fraction": step.fraction, "layers removed": len(pruned.layers_removed),
               "parameters": variant.parameters, "SFT steps": result.steps, "SFT seconds": round(result.train_seconds, 1),
               **{f"SFT {k}": v for k, v in peak.gib.items()}, "first loss": result.first_loss, "last loss": result.final_loss,
               "naming before SFT": before["naming accuracy"], "naming after SFT": after["naming accuracy"],
               "never stopped before SFT": before["never stopped"], "never stopped after SFT": after["never stopped"],
               "answering seconds": round(time.perf_counter() - started, 1), "log_history": result.log_history}
    atomic_write_json(record_path, {"setup": setup, "result": summary})
    return {**summary, "reused": False}


# Which of our levels stands for which of the paper's Table 2 rows, and why (shown in 04).
PAPER_ROW_BY_LAYERS_OF_32 = {7: "Pruned LLaVA (5.6 B)", 9: "Pruned LLaVA (5.2 B)"}


def paper_layers_of_32(fraction: float | None) -> int | None:
    """The paper's layer count (of 32) for a pruning level given as a fraction of the depth."""
    return None if fraction is None else round(fraction * 32)


def table_2(results: Sequence[dict[str, Any]], paper_table: "pd.DataFrame", num_layers: int) -> "pd.DataFrame":
    """The paper's Table 2 with this run's rows beside it. Rows map by the level's fraction of depth,
    as 03 maps levels: ours at 9/32 of the depth sits beside the paper's 9-of-32 row whatever our depth."""
    import pandas as pd

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
    return pd.DataFrame(rows).set_index("variant")
