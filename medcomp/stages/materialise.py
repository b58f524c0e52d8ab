"""Heavy model folders as recipes: a variant whose folder is missing is rebuilt from its parent.

A run folder must cross Kaggle sessions inside ~20 GB, and a 7B run writes ~150 GB of models. So
the merged and pruned models record how they were made (``extra["rebuild"]``): a pruned model is its
parent with layers removed (or a run of them replaced by a trained block, which stays in the run folder), a
merged model its base with its adapter (the adapter, a few MB, stays in the run folder). Their folders can live in ``runtime.scratch_dir``; a later session that lacks one
gets it back through ``ensure``, recursively (a recovered model needs its pruned model, which needs
the finetuned one). Every step is deterministic and stamp the same write id on a rebuild as on the
first build, so nothing computed from the first (answers, recovery, quantization) is redone.
4-bit checkpoints have no cheap recipe: 05 and 06 run in one session (README's session plan).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medcomp.params import FinetuneParams
from medcomp.pruning import prune_and_save
from medcomp.replacement import replace_and_save
from medcomp.runs import Run, Variant
from medcomp.training import merge_adapter, qlora_quantization


def prune_recipe(parent: str, layers: tuple[int, ...] | list[int], dtype: str) -> dict[str, Any]:
    return {"kind": "prune", "parent": parent, "layers": sorted(layers), "dtype": dtype}


def replace_recipe(parent: str, start: int, stop: int, dtype: str) -> dict[str, Any]:
    """Blocks ``start .. stop - 1`` of ``parent`` replaced by the trained block in the variant's ``extra["replacement_block"]``."""
    return {"kind": "replace", "parent": parent, "start": start, "stop": stop, "dtype": dtype}


def merge_recipe(base_variant: str | None, base: str, dtype: str, params: FinetuneParams) -> dict[str, Any]:
    """``base``: a hub id or path when ``base_variant`` is None (01's model source), else ignored."""
    return {"kind": "merge", "base_variant": base_variant, "base": base if base_variant is None else None, "dtype": dtype,
            "quantization": params.quantization, "compute_dtype": params.compute_dtype}


def ensure(run: Run, name: str) -> Variant:
    """The variant ``name`` with its model folder present: as it is, or rebuilt from its recipe."""
    variant = run.variant(name)
    folder = Path(variant.path)
    # a config without weights is no model: a size-capped copy (a Kaggle output) or a tidy-up that kept small files
    if (folder / "config.json").exists() and (any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").exists()):
        return variant
    recipe = variant.extra.get("rebuild")
    if recipe is None:
        raise FileNotFoundError(f"variant {name!r}: its model folder {variant.path} is missing and it has no recipe to rebuild it; "
                                f"rerun {variant.stage} (python -m medcomp run PARAMS --only {variant.stage})")
    if recipe["kind"] == "prune":
        parent = ensure(run, recipe["parent"])
        print(f"[medcomp] rebuilding {name}: {parent.name} without layers {recipe['layers']}")
        prune_and_save(parent.path, recipe["layers"], Path(variant.path), recipe["dtype"])
    elif recipe["kind"] == "replace":
        parent = ensure(run, recipe["parent"])
        print(f"[medcomp] rebuilding {name}: {parent.name} with blocks {recipe['start']}-{recipe['stop'] - 1} replaced by its trained block")
        replace_and_save(parent.path, recipe["start"], recipe["stop"], Path(variant.extra["replacement_block"]), Path(variant.path), recipe["dtype"])
    elif recipe["kind"] == "merge":
        base = ensure(run, recipe["base_variant"]).path if recipe["base_variant"] else recipe["base"]
        print(f"[medcomp] rebuilding {name}: its adapter merged into {recipe['base_variant'] or base}")
        settings = FinetuneParams(quantization=recipe["quantization"], compute_dtype=recipe["compute_dtype"])
        merge_adapter(base, Path(variant.extra["adapter"]), Path(variant.path), recipe["dtype"], qlora_quantization(settings))
    else:
        raise ValueError(f"variant {name!r} has an unknown recipe kind {recipe['kind']!r}")
    return run.variant(name)


def release(run: Run, dry_run: bool = False) -> list[tuple[str, Path, int]]:
    """Delete the model folders ``ensure`` rebuilds (every variant with a recipe): (variant, folder, bytes) each.

    A finished embedded run holds ~10 GB, most of it these folders; a five-seed sweep would fill a small disk.
    4-bit checkpoints, adapters, trained blocks, answers and reports stay. Not while a stage uses the run: a
    model it is about to read would be gone (``python -m medcomp tidy`` is for finished runs)."""
    released = []
    for name, variant in run.variants().items():
        folder = Path(variant.path)
        if "rebuild" not in variant.extra or not folder.is_dir():
            continue
        size = sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())
        if not dry_run:
            doomed = folder.with_name(f".released-{folder.name}")
            folder.rename(doomed)  # one rename: the folder is whole or gone, never a config whose shards are half deleted
            shutil.rmtree(doomed)
        released.append((name, folder, size))
    return released


def ensure_for_serving(run: Run, variant: Variant) -> Variant:
    """What loading ``variant`` as it is served needs on disk: its own folder (full precision), or its
    nf4 base's (a QLoRA deployment); 4-bit folders must be there already."""
    kind = variant.extra.get("format")
    if kind is None:
        return ensure(run, variant.name)
    if kind == "qlora" and variant.parent is not None:
        source = run.variant(variant.parent)
        if source.parent is not None and source.extra.get("sft_base") == run.variant(source.parent).path:
            ensure(run, source.parent)  # the pruned model a recovered model was trained on
        return variant
    if not Path(variant.path).exists():
        raise FileNotFoundError(f"variant {variant.name!r}: its 4-bit folder {variant.path} is missing; 4-bit models are not rebuilt "
                                f"from a recipe: rerun {variant.stage} in this session (python -m medcomp run PARAMS --only {variant.stage})")
    return variant
