"""08_beyond: which 4-bit models that keep the finetune to build, and building them (issue 31).

08 runs after 05 and before 06 and 07, so that 06 measures its variants and 07 scores them beside the
paper's, with the same benchmark round and the same judge; 07 draws the frontier and counts this package's
claims. For the finetuned model and the first recovered level (the paper's pipeline model) it builds:
- ``<source>-gptq``: GPTQ (GPTQModel), the standard 4-bit method the paper's Table 3 lacks, stored as int4;
- ``<source>-<grid>-qalora``: QA-LoRA trained against 05's 4-bit checkpoint of the source (``grid``),
  folded exactly into its offsets: a plain 4-bit model (``medcomp.qalora``, ``medcomp.int4``);
- ``<source>-<grid>-lora``: an ordinary LoRA trained against the same grid, served unmerged;
- ``<source>-qlora``: the QLoRA deployment, the nf4 base as trained on with the adapter unmerged (from 05);
- ``<pruned or recovered>-streamline-gptq``: GPTQ of the replaced model (LLM-Streamline) chosen on validation;
- ``<pruned>-<method>-sft``: 04's recovery through peft's AWQ layers (from 05; off by default: slow).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medcomp import int4, qalora
from medcomp.distillation import Distillation, TeacherTargets, teacher_targets
from medcomp.evaluation import PeakMemory, answer_stats, generate_answers, naming_accuracy
from medcomp.files import content_hash
from medcomp.loading import checkpoint_identity, decoder_bytes, load_processor, load_variant, tensor_bytes
from medcomp.runs import Variant
from medcomp.stages.materialise import ensure, ensure_for_serving
from medcomp.stages.quantize import QuantizationStep, build_quantized, recover_on_quantized
from medcomp.stages.recover import RecoveryStep, recover
from medcomp.training import training_examples


@dataclass(frozen=True)
class BeyondStep:
    source: str  # finetuned, or the first recovered level
    method: str  # gptq, qalora, lora (on the grid), qlora
    role: str  # finetuned, recovered
    grid: str | None = None  # 05's 4-bit variant the adapters train on

    @property
    def name(self) -> str:
        return f"{self.grid}-{self.method}" if self.grid else f"{self.source}-{self.method}"


def beyond_plan(settings, variants: dict[str, Any], recovered: Sequence[str]) -> list[BeyondStep]:
    """The variants 08 builds (``params.BeyondParams``); ``recovered`` are 04's, the first by depth the pipeline's."""
    if "finetuned" not in variants:
        raise ValueError("no 'finetuned' variant registered: run 01_finetune first")
    by_depth = [name for name in recovered if not name.endswith("-magnitude")]
    sources = [("finetuned", "finetuned"), *[(name, "recovered") for name in by_depth[:1]]]
    steps = [BeyondStep(source, "gptq", role) for source, role in sources] if settings.gptq else []
    if settings.qlora_deployment:  # first: on the real path it is the distillation's teacher (fits a T4)
        steps += [BeyondStep(source, "qlora", role) for source, role in sources if "adapter" in variants[source].extra]
    for method, wanted in (("qalora", settings.qalora), ("lora", settings.lora_on_grid)):
        for source, role in sources if wanted else []:
            grid = f"{source}-{settings.grid}"
            if grid not in variants:
                raise ValueError(f"beyond.{'qalora' if method == 'qalora' else 'lora_on_grid'} trains on {grid!r}, which 05 did not build: "
                                 f"add {settings.grid!r} to quantization.{role}, or set beyond.grid to a method it has")
            steps.append(BeyondStep(source, method, role, grid))
    if settings.qalora and settings.distill_from and len(sources) > 1:  # prune, then distil into the 4-bit grid (issue 32)
        steps.append(BeyondStep(sources[1][0], "qalora-kd", "recovered", f"{sources[1][0]}-{settings.grid}"))
    return steps


def build_on_grid(run, stage: str, step: BeyondStep, train_examples, test_examples, recipe, dtype: str, device: str,
                  max_new_tokens: int, batch_size: int, seed: int = 0, distillation: Distillation | None = None) -> dict[str, Any]:
    """Train adapters against ``step.grid`` (or reuse them: same grid checkpoint, recipe, data, seed and teacher), fold
    them (QA-LoRA) and measure the fold, save the int4 model, answer the test set, register."""
    grid = run.variant(step.grid)
    source = ensure(run, step.source)
    name = step.name
    setup = content_hash([checkpoint_identity(grid.path), recipe.model_dump(mode="json"), [(e.image, e.question) for e in train_examples],
                          seed, step.method, distillation.describe() if distillation else None], 16)
    previous = run.variants().get(name)
    started = time.perf_counter()
    if previous is not None and previous.extra.get("setup") == setup and run.has_answers(name) and (Path(previous.path) / "config.json").exists():
        variant, answers = previous, run.answers(name)
        model = load_variant(variant, dtype, device)
    else:
        processor = load_processor(source.path)
        with PeakMemory() as memory:
            trained = qalora.train_on_grid(grid.path, source.path, device, train_examples, recipe, run.stage_dir(stage) / name, seed,
                                           pooled=step.method != "lora", distillation=distillation)
        exactness = qalora.fold_exactness(trained.model, processor, train_examples[:4]) if step.method != "lora" else {}
        path = int4.save_int4(trained.model, processor, run.model_dir(stage, name))
        variant = Variant(name=name, stage=stage, path=str(path), parent=grid.name, layers_removed=grid.layers_removed, bits=4,
                          parameters=grid.parameters,
                          notes=(f"LoRA on {grid.name}, unmerged" if step.method == "lora" else f"QA-LoRA on {grid.name}, folded into the 4-bit offsets"
                                 + (f", distilled from {distillation.targets.identity}" if distillation else "")),
                          extra={"format": "int4", "setup": setup, "role": step.role, "method": step.method, "grid": grid.name,
                                 "SFT seconds": round(trained.train_seconds, 1), "SFT peak": memory.gib, "trainable parameters": trained.trainable_parameters,
                                 "log_history": trained.log_history, **exactness})
        del trained
        run.register_variant(variant)
        model = load_variant(variant, dtype, device)
        answers = generate_answers(model, processor, test_examples, max_new_tokens, batch_size, description=f"answering ({name})")
        run.save_answers(name, answers)
    extra = variant.extra
    result = {"variant": name, "source": step.source, "method": step.method, "role": step.role, "grid": grid.name,
              "SFT seconds": extra["SFT seconds"], "trainable parameters": extra["trainable parameters"],
              "fold error": extra.get("fold error"), "served error": extra.get("served error"),
              "decoder bytes": decoder_bytes(model), "model bytes": tensor_bytes(model), **answer_stats(answers),
              "seconds": time.perf_counter() - started, "log_history": extra["log_history"]}
    del model
    return result


def build_all(run, stage: str, plan: Sequence[BeyondStep], settings, conversations, train_examples, test_examples, recipe, dtype: str,
              device: str, group_size: int, max_new_tokens: int, batch_size: int, seed: int = 0) -> list[dict[str, Any]]:
    """Every step of the plan, then quantize-then-recover for each method asked; one result per variant.
    ``conversations``: GPTQ's calibration data (05's AWQ calibration set)."""
    results = []
    for step in plan:
        if step.method in ("qlora", "gptq"):  # 05's build: quantize (GPTQ) or reuse the adapter (QLoRA), reload, answer, register
            result = build_quantized(run, stage, QuantizationStep(step.source, step.method, step.role), conversations, test_examples, dtype, device,
                                     group_size, max_new_tokens, batch_size)
            result |= {"SFT seconds": 0.0, "grid": None}
        else:
            distillation = None
            if step.method == "qalora-kd":
                targets = teacher_targets_for(run, stage, settings.distill_from, train_examples, recipe, settings.distill_top_k, dtype, device, seed)
                distillation = Distillation(targets, settings.distill_temperature, 1.0)
            result = build_on_grid(run, stage, step, train_examples, test_examples, recipe, dtype, device, max_new_tokens, batch_size, seed,
                                   distillation)
        results.append(result)
        print(f"{step.name}: naming {result['naming accuracy']:.1%}; decoder {result['decoder bytes'] / 1e6:.1f} MB")
    variants = run.variants()
    pruned = next((variants[s.source].parent for s in plan if s.role == "recovered"), None)
    for method in settings.quantize_then_recover:
        if pruned is None or f"{pruned}-{method}" not in variants:
            raise ValueError(f"beyond.quantize_then_recover {method!r} needs 05's {pruned}-{method}: add {method!r} to quantization.pruned")
        result = recover_on_quantized(run, stage, f"{pruned}-{method}", train_examples, test_examples, recipe, device, max_new_tokens, batch_size, seed=seed)
        results.append(result)
    return results


def results_table(run, results: Sequence[dict[str, Any]], reference_bytes: int) -> pd.DataFrame:
    """Each variant beside the model it keeps the finetune of and the 4-bit grid it was trained on: naming,
    bytes against the finetuned model's, the fold's exactness and the training time."""
    rows = []
    for r in results:
        grid = r.get("grid")
        rows.append({"variant": r["variant"], "method": r["method"], "naming accuracy": r["naming accuracy"],
                     "source naming (unquantized)": naming_accuracy(run.answers(r["source"])) if run.has_answers(r["source"]) else None,
                     "grid naming (05)": naming_accuracy(run.answers(grid)) if grid and run.has_answers(grid) else None,
                     "model MB": r["model bytes"] / 1e6, "model bytes × finetuned": r["model bytes"] / reference_bytes,
                     "fold error (fp32)": r.get("fold error"), "served error (bf16 kernel)": r.get("served error"),
                     "SFT seconds": r.get("SFT seconds")})
    return pd.DataFrame(rows).set_index("variant")


def findings(table: pd.DataFrame) -> str:
    """Markdown: per variant, its naming against its unquantized source and its 05 grid, and the fold's error."""
    lines = []
    for name, r in table.iterrows():
        against = [f"{label} {r[column]:.1%}" for label, column in (("unquantized", "source naming (unquantized)"), ("05's 4-bit grid", "grid naming (05)"))
                   if pd.notna(r[column])]
        fold = f"; folded with a relative logit error of {r['fold error (fp32)']:.1e} (fp32)" if pd.notna(r["fold error (fp32)"]) else ""
        lines.append(f"- `{name}` ({r['method']}): names **{r['naming accuracy']:.1%}** against {', '.join(against)}, "
                     f"at {r['model bytes × finetuned']:.2f}× the finetuned model's bytes{fold}.")
    return "\n".join(lines) or "Nothing was built: every method of `beyond` is off."


# ------------------------------------------------------------------ pruning that loses less (issue 32)

def _processor_for(run, variant: Variant):
    """A full-precision variant's folder holds its processor; a 4-bit or adapter variant is served with the finetuned model's."""
    return load_processor(variant.path if variant.extra.get("format") is None else run.variant("finetuned").path)


def teacher_targets_for(run, stage: str, teacher_name: str, train_examples, recipe, top_k: int, dtype: str, device: str,
                        seed: int = 0) -> TeacherTargets:
    """The teacher's top-k answer-token logits over the training sequences the recovery's steps draw (``recipe`` and
    ``seed`` fix which): computed once, in one pass with only the teacher loaded, and cached in the stage folder by
    teacher checkpoint, data, the sequences drawn and k."""
    from medcomp.training import visited_indices

    teacher = ensure_for_serving(run, run.variant(teacher_name))
    sequences = training_examples(train_examples, recipe)
    drawn = sorted(set(visited_indices(len(sequences), recipe, seed)))
    identity = content_hash([teacher.name, checkpoint_identity(teacher.path), [repr(s) for s in sequences], drawn, top_k], 16)
    path = run.stage_dir(stage) / f"teacher-{teacher.name}-{identity}.pt"
    if path.exists():
        return TeacherTargets.load(path)
    model = load_variant(teacher, dtype, device)
    targets = teacher_targets(model, _processor_for(run, teacher), sequences, top_k, identity=identity, only=drawn)
    del model
    targets.save(path)
    return targets


def distilled_recoveries(run, stage: str, settings, recovered: str, train_examples, test_examples, recipe, dtype: str, device: str,
                         max_new_tokens: int, batch_size: int, seed: int = 0) -> tuple[list[dict[str, Any]], TeacherTargets | None]:
    """04's recovery of ``recovered``'s pruned model, same LoRA, steps, data and seed, with the KL term weighted by each
    of ``settings.distill_alphas``: ``<recovered>-kd`` (alpha 1, distillation alone), ``<recovered>-kd50`` (half)."""
    if settings.distill_from is None:
        return [], None
    if settings.distill_from not in run.variants():
        raise ValueError(f"beyond.distill_from names {settings.distill_from!r}, which is not registered: use 'finetuned' or a variant 08 builds first")
    targets = teacher_targets_for(run, stage, settings.distill_from, train_examples, recipe, settings.distill_top_k, dtype, device, seed)
    source = run.variant(recovered)
    results = []
    for alpha in settings.distill_alphas:
        name = f"{recovered}-kd" + ("" if alpha == 1 else f"{round(alpha * 100)}")
        step = RecoveryStep(source.parent, name, source.extra.get("fraction"))
        result = recover(run, stage, step, train_examples, test_examples, recipe, dtype, device, max_new_tokens, batch_size, seed,
                         Distillation(targets, settings.distill_temperature, alpha))
        results.append(result | {"alpha": alpha, "teacher": settings.distill_from, "teacher top-k mass": targets.mass})
        print(f"{name}: {'reused' if result['reused'] else 'trained'} in {result['SFT seconds']:.0f} s; naming {result['naming after SFT']:.1%}")
    return results, targets


def validation_naming(run, stage: str, names: Sequence[str], validation_examples, dtype: str, device: str, max_new_tokens: int,
                      batch_size: int) -> pd.Series:
    """Held-out naming of each variant on the validation split (answers cached in the stage folder by variant and
    checkpoint): what 08 chooses by. The test set only reports. Only the naming question is answered: it is all
    naming accuracy reads, and the other two took two thirds of the time."""
    import json

    from medcomp.files import atomic_write_json

    validation_examples = [e for e in validation_examples if e.question_kind == "name"]
    accuracy = {}
    for name in names:
        variant = ensure_for_serving(run, run.variant(name))
        key = content_hash([name, checkpoint_identity(variant.path), [(e.image, e.question) for e in validation_examples]], 12)
        path = run.stage_dir(stage) / "validation" / f"{name}-{key}.json"
        if path.exists():
            answers = json.loads(path.read_text())
        else:
            model = load_variant(variant, dtype, device)
            answers = generate_answers(model, _processor_for(run, variant), validation_examples, max_new_tokens, batch_size,
                                       description=f"validation ({name})")
            del model
            atomic_write_json(path, answers)
        accuracy[name] = naming_accuracy(answers)
    return pd.Series(accuracy, name="validation naming")


def validation_choices(run, stage: str, groups: dict[str, Sequence[str]], validation_examples, dtype: str, device: str, max_new_tokens: int,
                       batch_size: int) -> pd.DataFrame:
    """Per group of candidates (the first its baseline), each one's validation and test naming and which one is
    chosen: by validation (``chosen_on_validation``); the test column only reports."""
    rows = []
    for group, names in groups.items():
        accuracy = validation_naming(run, stage, names, validation_examples, dtype, device, max_new_tokens, batch_size)
        chosen = chosen_on_validation(accuracy, names[0])
        rows += [{"choice": group, "variant": name, "validation naming": accuracy[name], "test naming": naming_accuracy(run.answers(name)),
                  "chosen": name == chosen} for name in names]
    return pd.DataFrame(rows).set_index(["choice", "variant"])


def replaced_in_four_bits(run, stage: str, candidates: Sequence[str], validation_examples, conversations, test_examples, dtype: str,
                          device: str, group_size: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """GPTQ of the replaced model (LLM-Streamline) chosen on validation among ``candidates`` (the recovered one first: it
    wins a tie), so that prune, replace and quantize compose: ``<chosen>-gptq``. Without a validation split the first."""
    accuracy = validation_naming(run, stage, candidates, validation_examples, dtype, device, max_new_tokens, batch_size) \
        if validation_examples else pd.Series({candidates[0]: float("nan")}, name="validation naming")
    chosen = chosen_on_validation(accuracy, candidates[0]) if validation_examples else candidates[0]
    result = build_quantized(run, stage, QuantizationStep(chosen, "gptq", "recovered"), conversations, test_examples, dtype, device,
                             group_size, max_new_tokens, batch_size)
    return result | {"chosen on validation": chosen, "validation naming": accuracy.to_dict()}


def chosen_on_validation(accuracy: pd.Series, baseline: str) -> str:
    """The best variant on validation; a tie goes to ``baseline`` (04's recovery), then to the first listed."""
    best = accuracy.max()
    return baseline if accuracy.get(baseline) == best else str(accuracy.idxmax())


def iterative_pruning(run, stage: str, importance_params, recovered: str, train_examples, test_examples, recipe, dtype: str, device: str,
                      max_new_tokens: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """SLEB's iterative removal (``importance.iterative_removal``) to the depth of ``recovered``'s pruned model, on 02's
    calibration sample; where it removes other blocks than 02's one-shot ranking, that model is pruned (03's build)
    and recovered with 04's recipe as ``pruned-N-sleb`` / ``recovered-N-sleb``. The order is cached by the finetuned
    checkpoint, the calibration and the count."""
    import json

    from medcomp.files import atomic_write_json
    from medcomp.importance import iterative_removal, sample_calibration
    from medcomp.loading import decoder_layers, load_llava
    from medcomp.pruning import prunable_layers
    from medcomp.stages.prune import PruningStep, build_levels

    source = run.variant(recovered)
    one_shot = sorted(run.variant(source.parent).layers_removed)
    finetuned = ensure(run, "finetuned")
    calibration = sample_calibration(train_examples, importance_params.calibration_size, seed)
    key = content_hash([checkpoint_identity(finetuned.path), [(e.image, e.question) for e in calibration], len(one_shot),
                        importance_params.protect_first, importance_params.protect_last], 12)
    record = run.stage_dir(stage) / f"sleb-{key}.json"
    started = time.perf_counter()
    if record.exists():
        saved = json.loads(record.read_text())
    else:
        model = load_llava(finetuned.path, dtype=dtype, device=device)
        candidates = prunable_layers(len(decoder_layers(model)), importance_params.protect_first, importance_params.protect_last)
        removed, rounds = iterative_removal(model, load_processor(finetuned.path), calibration, candidates, len(one_shot), importance_params.batch_size)
        del model
        saved = {"removed": removed, "rounds": [{str(k): v for k, v in r.items()} for r in rounds], "seconds": time.perf_counter() - started}
        atomic_write_json(record, saved)
    outcome = {"one-shot blocks": one_shot, "iterative blocks (removal order)": saved["removed"], "ranking seconds": round(saved["seconds"], 1),
               "same blocks": sorted(saved["removed"]) == one_shot, "rounds": saved["rounds"]}
    if outcome["same blocks"]:
        return outcome
    name = f"pruned-{len(one_shot)}-sleb"
    build_levels(run, stage, finetuned, [PruningStep(name, source.extra.get("fraction"), "iterative (SLEB)", tuple(sorted(saved["removed"])))],
                 test_examples, dtype, device, max_new_tokens, batch_size)
    result = recover(run, stage, RecoveryStep(name, name.replace("pruned-", "recovered-", 1), source.extra.get("fraction")), train_examples, test_examples,
                     recipe, dtype, device, max_new_tokens, batch_size, seed)
    return outcome | {"recovered": result["variant"], "naming before SFT": result["naming before SFT"], "naming after SFT": result["naming after SFT"]}


def block_replacement(run, stage: str, settings, importance_params, recovered: str, train_examples, test_examples, recipe, dtype: str,
                      device: str, max_new_tokens: int, batch_size: int, seed: int = 0, validation_examples=()) -> dict[str, Any]:
    """LLM-Streamline (``medcomp.replacement``) at the depth of ``recovered``'s pruned model (N blocks removed): the most
    similar contiguous run of N + 1 removable blocks of the finetuned model is replaced by one block trained on its hidden
    states (``pruned-N-streamline``: the block count and bytes of ``pruned-N``), then recovered with 04's recipe
    (``recovered-N-streamline``). The span, the trained block and its record are cached by the finetuned checkpoint, the
    training sample and the settings. The block's error is also measured on ``validation_examples`` (held out)."""
    import json

    from medcomp import replacement
    from medcomp.encoding import teacher_forced_batches
    from medcomp.files import atomic_write_json
    from medcomp.importance import sample_calibration
    from medcomp.loading import count_parameters, decoder_layers, load_llava, release_accelerator_memory
    from medcomp.pruning import prunable_layers
    from medcomp.stages.materialise import replace_recipe

    source = run.variant(recovered)
    count = len(run.variant(source.parent).layers_removed)
    finetuned = ensure(run, "finetuned")
    examples = sample_calibration(train_examples, min(settings.replacement_samples, len(train_examples)), seed)
    key = content_hash([checkpoint_identity(finetuned.path), [(e.image, e.question) for e in [*examples, *validation_examples]], count,
                        settings.replacement_steps, settings.replacement_learning_rate, importance_params.protect_first, importance_params.protect_last,
                        importance_params.batch_size, seed], 12)
    record_path, block_path = run.stage_dir(stage) / f"streamline-{key}.json", run.stage_dir(stage) / f"streamline-{key}.safetensors"
    if record_path.exists() and block_path.exists():
        saved = json.loads(record_path.read_text())
    else:
        started = time.perf_counter()
        model = load_llava(finetuned.path, dtype=dtype, device=device)
        processor = load_processor(finetuned.path)
        batches = teacher_forced_batches(processor, examples, importance_params.batch_size)
        candidates = prunable_layers(len(decoder_layers(model)), importance_params.protect_first, importance_params.protect_last)
        similarities = replacement.span_similarities(model, batches, count + 1, candidates)
        start = replacement.choose_span(similarities)
        recorded = replacement.record_run(model, batches, start, start + count + 1)
        held_out = replacement.record_run(model, teacher_forced_batches(processor, validation_examples, importance_params.batch_size),
                                          start, start + count + 1) if validation_examples else None
        span = {i: replacement.detached_copy(decoder_layers(model)[i], "cpu", None) for i in range(start, start + count + 1)}
        del model  # on a T4 the fp16 model leaves the GPU before the block trains in fp32
        release_accelerator_memory()
        trained = replacement.train_replacement(span, recorded, settings.replacement_steps, settings.replacement_learning_rate, device, seed)
        replacement.save_block(trained.block, block_path)
        validation_error = replacement.relative_error(trained.block, held_out, device) if held_out else None
        del recorded, span, held_out
        saved = {"span": [start, start + count + 1], "span similarities": {str(k): v for k, v in similarities.items()},
                 "initialised from": trained.initialised_from, "error before": trained.error_before, "error after": trained.error_after,
                 "validation error": validation_error,
                 "losses": trained.losses, "training seconds": trained.seconds, "seconds": time.perf_counter() - started}
        atomic_write_json(record_path, saved)
    start, stop = saved["span"]
    name = f"pruned-{count}-streamline"
    setup = [checkpoint_identity(finetuned.path), replacement.block_identity(block_path)]
    existing = run.variants().get(name)
    if existing is None or existing.extra.get("setup") != json.loads(json.dumps(setup)) or not run.has_answers(name):
        target = replacement.replace_and_save(finetuned.path, start, stop, block_path, run.model_dir(stage, name), dtype)
        model = load_llava(str(target), dtype=dtype, device=device)
        variant = Variant(name=name, stage=stage, path=str(target), parent="finetuned", layers_removed=tuple(range(start + 1, stop)),
                          bits=finetuned.bits, parameters=count_parameters(model),
                          notes=f"blocks {start}-{stop - 1} replaced by one trained block (LLM-Streamline)",
                          extra={"rebuild": replace_recipe("finetuned", start, stop, dtype), "replacement_block": str(block_path), "setup": setup,
                                 "fraction": source.extra.get("fraction")})
        answers = generate_answers(model, load_processor(str(target)), test_examples, max_new_tokens, batch_size, description=f"answering ({name})")
        del model
        run.register_variant(variant)
        run.save_answers(name, answers)
    result = recover(run, stage, RecoveryStep(name, name.replace("pruned-", "recovered-", 1), source.extra.get("fraction")), train_examples,
                     test_examples, recipe, dtype, device, max_new_tokens, batch_size, seed)
    return {"span (blocks replaced)": f"{start}-{stop - 1}", "one-shot blocks": sorted(run.variant(source.parent).layers_removed),
            "initialised from block": saved["initialised from"], "relative error before training": saved["error before"],
            "relative error after training": saved["error after"], "relative error on validation": saved["validation error"],
            "replacement seconds": round(saved["seconds"], 1),
            "recovered": result["variant"], "naming before SFT": result["naming before SFT"], "naming after SFT": result["naming after SFT"],
            "span similarities": saved["span similarities"], "log_history": [{"step": i + 1, "loss": loss} for i, loss in enumerate(saved["losses"])]}
