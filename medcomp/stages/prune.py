"""03_prune: one pruned variant per level of the chosen ranking (plus the magnitude baseline), each
saved, reloaded, counted and answering the test set; an interrupted stage resumes."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import Any, Sequence

from medcomp.evaluation import answer_stats, generate_answers
from medcomp.loading import count_parameters, decoder_layers, load_llava, load_processor, tensor_bytes
from medcomp.pruning import first_of_ranking, prune_and_save, pruned_from
from medcomp.runs import Variant
from medcomp.stages.materialise import prune_recipe


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


def build_levels(run, stage: str, parent: Variant, plan: Sequence[PruningStep], test_examples, dtype: str, device: str,
                 max_new_tokens: int, batch_size: int) -> list[dict[str, Any]]:
    """For each step: prune, save, reload, count, answer the test set, register the variant and its answers.

    A step already built from the current ``parent`` checkpoint with the same layers, registered and
    answered, is read back, so an interrupted stage resumes; a rebuilt parent rebuilds every level.
    Level 0 is ``parent`` itself, with the answers it already has.
    """
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
            target = run.model_dir(stage, step.name)
            reusable = (existing is not None and existing.layers_removed == step.layers and run.has_answers(step.name)
                        and pruned_from(target, parent.path, step.layers))
            if not reusable:
                prune_and_save(parent.path, step.layers, target, dtype)
            model = load_llava(str(target), dtype=dtype, device=device)
            if len(decoder_layers(model)) != parent_layers - len(step.layers):
                raise RuntimeError(f"{target} reloaded with {len(decoder_layers(model))} layers, expected {parent_layers - len(step.layers)}")
            variant = Variant(name=step.name, stage=stage, path=str(target), parent=parent.name, layers_removed=step.layers,
                              bits=parent.bits, parameters=count_parameters(model),
                              notes=f"{len(step.layers)} blocks removed by the {step.ranking} ranking",
                              extra={"rebuild": prune_recipe(parent.name, step.layers, dtype)})
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
        if run.scratch is not None and step.name != parent.name:
            shutil.rmtree(run.model_dir(stage, step.name), ignore_errors=True)  # answered; its recipe rebuilds it for 04 and 05
    return results
