"""04_sft_pruned: recovery SFT of pruned models (paper section 3.3, Table 2).

The pruned models of ``03_prune`` are finetuned again with QLoRA (paper: r=16, alpha=8) on the same
training conversations, then merged like 01's model. Each recovered model is registered as a variant
whose parent is its pruned model, with its answers to the held-out test set. A model already recovered
from the current pruned checkpoint with the same settings and data is read back, so an interrupted
stage resumes where it stopped.
"""


from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

from medcomp.distillation import Distillation
from medcomp.evaluation import PeakMemory, answer_stats, generate_answers
from medcomp.files import atomic_write_json, content_hash
from medcomp.loading import checkpoint_identity, count_parameters, load_llava, load_processor
from medcomp.params import FinetuneParams, RecoveryParams
from medcomp.pruning import levels_for_depth
from medcomp.runs import Run, Variant
from medcomp.stages.materialise import ensure, merge_recipe
from medcomp.training import finetune


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
            device: str, max_new_tokens: int, batch_size: int, seed: int = 0, distillation: Distillation | None = None) -> dict[str, Any]:
    """QLoRA-finetune the pruned variant, merge, reload, answer the test set, register; or read it back. With
    ``distillation`` (08_beyond) the loss is the teacher's (``medcomp.distillation``); all else is 04's."""
    pruned = ensure(run, step.pruned)
    output_dir = run.stage_dir(stage) / step.recovered
    setup = _setup(pruned.path, params, train_examples, seed) | ({"distillation": distillation.describe()} if distillation else {})
    record_path = output_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is not None and record["setup"] == setup and step.recovered in run.variants() and run.has_answers(step.recovered):
        return {**record["result"], "reused": True}

    with PeakMemory() as peak:
        result = finetune(pruned.path, dtype, device, train_examples, params, output_dir, seed=seed,
                          merged_dir=run.model_dir(stage, f"{step.recovered}/merged"), distillation=distillation)
    started = time.perf_counter()
    model = load_llava(str(result.merged_dir), dtype=dtype, device=device)
    variant = Variant(name=step.recovered, stage=stage, path=str(result.merged_dir), parent=pruned.name,
                      layers_removed=pruned.layers_removed, bits=pruned.bits, parameters=count_parameters(model),
                      notes=f"QLoRA {'distillation' if distillation else 'SFT'} (r={params.lora.r}, alpha={params.lora.alpha}) of {pruned.name}",
                      extra={"adapter": str(result.adapter_dir), "sft_base": pruned.path, "fraction": step.fraction,
                             "rebuild": merge_recipe(pruned.name, pruned.path, dtype, params)})
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
    if run.scratch is not None and Path(pruned.path).is_relative_to(run.scratch):
        shutil.rmtree(pruned.path, ignore_errors=True)  # recovered; its recipe rebuilds it if 05 needs it
    return {**summary, "reused": False}


def recover_all(run: Run, stage: str, plan: Sequence[RecoveryStep], train_examples, test_examples, params: FinetuneParams, dtype: str,
                device: str, max_new_tokens: int, batch_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """``recover`` every step of the plan in order, each result with its wall time in the stage."""
    results = []
    for step in plan:
        started = time.perf_counter()
        result = recover(run, stage, step, train_examples, test_examples, params, dtype, device, max_new_tokens, batch_size, seed=seed)
        results.append(result | {"stage seconds": time.perf_counter() - started})
        print(f"{step.recovered}: {'reused' if result['reused'] else 'trained'}; naming {result['naming before SFT']:.1%} → {result['naming after SFT']:.1%}")
    return results
