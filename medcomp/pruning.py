"""Depth pruning: remove whole decoder blocks of a LLaVA's language model (paper section 3.2).

One removal function serves both uses: ``02_layer_importance`` removes one block at a time in memory
(``without_layers``, restored afterwards) and ``03_prune`` removes several and saves the result
(``drop_layers`` + ``save_pretrained``). A removal keeps the model one that transformers saves,
reloads and generates from with the KV cache: the config's layer count, each attention's
``layer_idx`` (the KV cache is indexed by it) and ``layer_types`` (where the config has it) follow.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from medcomp.files import atomic_write_json, content_hash
from medcomp.loading import checkpoint_identity, decoder_layers, load_llava, load_processor, save_with_processor


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
def _restored_afterwards(model) -> Iterator[tuple[list, list | None]]:
    """Yield the block list and ``layer_types`` as they are; on exit put both back and renumber."""
    original = list(decoder_layers(model))
    config = _text_config(model)
    layer_types = list(config.layer_types) if getattr(config, "layer_types", None) is not None else None
    try:
        yield original, layer_types
    finally:
        _replace_layers(model, torch.nn.ModuleList(original))
        if layer_types is not None:
            config.layer_types = layer_types
        _renumber(model)


@contextmanager
def without_layers(model, indices: Sequence[int]) -> Iterator:
    """The model with blocks ``indices`` removed, restored exactly (modules, indices, config) on exit."""
    with _restored_afterwards(model):
        yield drop_layers(model, indices)


class _SeenOutput(torch.nn.Module):
    """Stands in for a run of decoder blocks: returns the hidden states they were seen to produce."""

    def __init__(self, hidden_states: torch.Tensor):
        super().__init__()
        self.hidden_states = hidden_states

    def forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        return self.hidden_states


@contextmanager
def without_layer_given_input(model, index: int, layer_input: torch.Tensor) -> Iterator:
    """``without_layers(model, [index])`` for one batch whose input to block ``index`` in the unpruned
    model is ``layer_input``: the blocks before ``index`` are not run again but replaced by that input.

    Why: removing a block cannot change what the blocks before it compute, so a sweep that removes
    each block in turn recomputes, on average, half the model for nothing. The blocks after ``index``
    receive the same tensors as in ``without_layers``, so the result is the same to the bit (tested).
    Valid only for a forward on exactly the batch ``layer_input`` was captured on, without a KV cache.
    """
    if index == 0:
        with without_layers(model, [0]) as pruned:
            yield pruned
        return
    with _restored_afterwards(model) as (original, layer_types):
        if layer_types is not None:
            _text_config(model).layer_types = [layer_types[index - 1], *layer_types[index + 1 :]]
        _replace_layers(model, torch.nn.ModuleList([_SeenOutput(layer_input), *original[index + 1 :]]))
        _renumber(model)
        yield model


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


def prune_and_save(source: str, layers: Sequence[int], target: Path, dtype: str = "float32") -> Path:
    """Load ``source``, remove ``layers``, ``save_pretrained`` model and processor to ``target`` (atomic).

    ``pruning.json`` records the layers and which checkpoint of ``source`` they were removed from.
    """
    model = load_llava(source, dtype=dtype)
    drop_layers(model, layers)
    # deterministic: the same layers removed from the same checkpoint is the same checkpoint, rebuilt or not
    save_with_processor(model, load_processor(source), target, content_hash(["prune", checkpoint_identity(source), sorted(layers), dtype], 32))
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
