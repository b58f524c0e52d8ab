"""Depth pruning: remove whole decoder blocks of a LLaVA's language model (paper section 3.2).

One removal function serves both uses: ``02_layer_importance`` removes one block at a time in memory
(``without_layers``, restored afterwards) and ``03_prune`` removes several and saves the result
(``drop_layers`` + ``save_pretrained``). A removal keeps the model one that transformers saves,
reloads and generates from with the KV cache: the config's layer count, each attention's
``layer_idx`` (the KV cache is indexed by it) and ``layer_types`` (where the config has it) follow.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from medcomp.files import atomic_write_json
from medcomp.models import checkpoint_identity, count_parameters, decoder_layers, load_llava, load_processor, save_with_processor, tensor_bytes
from medcomp.runs import Variant

if TYPE_CHECKING:
    import pandas as pd


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", config)


def _renumber(model) -> None:
    """Make every block's ``layer_idx`` its position, and the config agree with the block list."""
    layers = decoder_layers(model)
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    _text_config(model).num_hidden_layers = len(layers)


def drop_layers(model, indices: Sequence[int]):
    """Remove decoder blocks ``indices`` (0-based, of the current model) in place; returns ``model``."""
    layers = decoder_layers(model)
    removed = sorted(set(indices))
    if any(not 0 <= i < len(layers) for i in removed):
        raise IndexError(f"layers {removed} out of range for a model with {len(layers)} decoder layers")
    if len(removed) >= len(layers):
        raise ValueError("cannot remove every decoder layer")
    config = _text_config(model)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [kind for i, kind in enumerate(config.layer_types) if i not in removed]
    kept = [layer for i, layer in enumerate(layers) if i not in removed]
    layers_list = torch.nn.ModuleList(kept)
    _replace_layers(model, layers_list)
    _renumber(model)
    return model


def _replace_layers(model, layers: torch.nn.ModuleList) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.language_model.layers = layers


@contextmanager
def without_layers(model, indices: Sequence[int]) -> Iterator:
    """The model with blocks ``indices`` removed, restored exactly (modules, indices, config) on exit."""
    original = list(decoder_layers(model))
    config = _text_config(model)
    layer_types = list(config.layer_types) if getattr(config, "layer_types", None) is not None else None
    try:
        yield drop_layers(model, indices)
    finally:
        _replace_layers(model, torch.nn.ModuleList(original))
        if layer_types is not None:
            config.layer_types = layer_types
        _renumber(model)


def prunable_layers(num_layers: int, protect_first: int = 2, protect_last: int = 1) -> list[int]:
    """Blocks that may be removed: all but the first ``protect_first`` and last ``protect_last``.

    The paper protects blocks 1, 2 and 32 of 32 (1-based), following Shortened LLaMA.
    """
    if protect_first + protect_last >= num_layers:
        raise ValueError(f"protecting {protect_first} + {protect_last} of {num_layers} layers leaves nothing to prune")
    return list(range(protect_first, num_layers - protect_last))


def levels_for_depth(fractions: Sequence[float], num_layers: int, max_removable: int) -> list[tuple[float, int]]:
    """Map fractions of depth onto layer counts for this model: ``[(fraction, count), ...]``.

    Each fraction is rounded to the nearest count (halves up); a count equal to or below the one
    before becomes that one plus one, so the levels stay distinct on a shallower model. On 32 layers
    (and on the embedded model's 30) the paper's levels (0, 2, 4, 7, 8, 9, 10) come back exactly.
    Levels that would remove more than ``max_removable`` layers are left out, with a warning.
    """
    import warnings

    levels: list[tuple[float, int]] = []
    for fraction in sorted(fractions):
        count = math.floor(fraction * num_layers + 0.5)
        if levels and count <= levels[-1][1]:
            count = levels[-1][1] + 1
        if count > max_removable:
            warnings.warn(f"level {fraction:.4f} would remove {count} layers; this model has only {max_removable} removable: left out")
            break
        levels.append((fraction, count))
    return levels


def first_of_ranking(ranking: Sequence[int], count: int) -> list[int]:
    """The ``count`` least important layers of a ranking (least important first), sorted by index."""
    if count > len(ranking):
        raise ValueError(f"the ranking has {len(ranking)} layers, {count} asked for")
    return sorted(ranking[:count])


@dataclass(frozen=True)
class PruningStep:
    name: str  # the variant's name
    fraction: float
    ranking: str
    layers: tuple[int, ...]  # blocks removed, 0-based indices of the unpruned model


def pruning_plan(orders: dict[str, Sequence[int]], ranking: str, levels: Sequence[tuple[float, int]],
                 magnitude_fraction: float | None = None) -> list[PruningStep]:
    """One step per level by ``ranking`` (level 0 is the unpruned model itself), plus the level at
    ``magnitude_fraction`` pruned by the magnitude ranking (the paper's Table 5 baseline)."""
    steps = [PruningStep("finetuned" if count == 0 else f"pruned-{count}", fraction, ranking, tuple(first_of_ranking(orders[ranking], count)))
             for fraction, count in levels]
    counts = dict(levels)
    if magnitude_fraction is not None and ranking != "magnitude" and magnitude_fraction in counts:
        count = counts[magnitude_fraction]
        if count:
            steps.append(PruningStep(f"pruned-{count}-magnitude", magnitude_fraction, "magnitude", tuple(first_of_ranking(orders["magnitude"], count))))
    return steps


def prune_and_save(source: str, layers: Sequence[int], target: Path, dtype: str = "float32") -> Path:
    """Load ``source``, remove ``layers``, ``save_pretrained`` model and processor to ``target`` (atomic).

    ``pruning.json`` records the layers and which checkpoint of ``source`` they were removed from.
    """
    model = load_llava(source, dtype=dtype)
    drop_layers(model, layers)
    save_with_processor(model, load_processor(source), target)
    atomic_write_json(Path(target) / "pruning.json", {"source": str(source), "source_identity": checkpoint_identity(source),
                                                       "layers_removed": sorted(layers)})
    return Path(target)


def pruned_from(target: str | Path, source: str | Path, layers: Sequence[int]) -> bool:
    """True if ``target`` holds exactly ``layers`` removed from the current checkpoint of ``source``."""
    record = Path(target) / "pruning.json"
    if not record.exists():
        return False
    import json

    saved = json.loads(record.read_text())
    current = [list(item) for item in checkpoint_identity(source)]
    return saved.get("layers_removed") == sorted(layers) and saved.get("source_identity") == current


def build_levels(run, stage: str, parent: Variant, plan: Sequence[PruningStep], test_examples, dtype: str, device: str,
                 max_new_tokens: int, batch_size: int) -> list[dict[str, Any]]:
    """For each step: prune, save, reload, count, answer the test set, register the variant and its answers.

    A step already built from the current ``parent`` checkpoint with the same layers, registered and
    answered, is read back, so an interrupted stage resumes; a rebuilt parent rebuilds every level.
    Level 0 is ``parent`` itself, with the answers it already has.
    """
    from medcomp.evaluation import answer_stats, generate_answers

    from transformers import AutoConfig

    results = []
    registered = run.variants()
    parent_layers = AutoConfig.from_pretrained(parent.path).text_config.num_hidden_layers
    for step in plan:  # each level's answering shows its own bar; nested bars garble a notebook's output
        started = time.perf_counter()
        if step.name == parent.name:
            variant, answers = parent, run.answers(parent.name)
            model = load_llava(parent.path, dtype=dtype, device=device)
        else:
            existing = registered.get(step.name)
            target = run.stage_dir(stage) / step.name
            reusable = (existing is not None and existing.layers_removed == step.layers and run.has_answers(step.name)
                        and pruned_from(target, parent.path, step.layers))
            if not reusable:
                prune_and_save(parent.path, step.layers, target, dtype)
            model = load_llava(str(target), dtype=dtype, device=device)
            if len(decoder_layers(model)) != parent_layers - len(step.layers):
                raise RuntimeError(f"{target} reloaded with {len(decoder_layers(model))} layers, expected {parent_layers - len(step.layers)}")
            variant = Variant(name=step.name, stage=stage, path=str(target), parent=parent.name, layers_removed=step.layers,
                              bits=parent.bits, parameters=count_parameters(model),
                              notes=f"{len(step.layers)} blocks removed by the {step.ranking} ranking")
            if reusable:
                answers = run.answers(step.name)
            else:
                answers = generate_answers(model, load_processor(str(target)), test_examples, max_new_tokens, batch_size,
                                           description=f"answering ({step.name})")
                run.register_variant(variant)
                run.save_answers(step.name, answers)
        results.append({"variant": step.name, "ranking": step.ranking, "fraction": step.fraction, "layers removed": len(step.layers),
                        "blocks": list(step.layers), "layers": len(decoder_layers(model)), "parameters": count_parameters(model),
                        "model bytes": tensor_bytes(model), **answer_stats(answers), "seconds": time.perf_counter() - started})
        del model
    return results


def table_1(results: Sequence[dict[str, Any]], paper_table: "pd.DataFrame", dtype: str) -> "pd.DataFrame":
    """The paper's Table 1 with this run's columns beside it, level by level (same fraction of depth)."""
    import pandas as pd

    base = next(r for r in results if r["layers removed"] == 0)
    rows = []
    for index, result in enumerate(r for r in results if r["ranking"] != "magnitude"):
        paper_row = paper_table.iloc[index] if index < len(paper_table) else None
        rows.append(_table_1_row(result, base, dtype, paper_row))
    for result in (r for r in results if r["ranking"] == "magnitude"):
        rows.append(_table_1_row(result, base, dtype, None))
    return pd.DataFrame(rows).set_index("variant")


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
