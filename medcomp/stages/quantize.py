"""05_quantize: which (model, method) cells to build, and building them: quantize (or reuse), reload and
check, answer the test set, register, and measure what of an SFT survived the rounding. The QLoRA
deployment and quantize-then-recover (``build_quantized``'s ``qlora`` method, ``recover_on_quantized``) are
08_beyond's, built through the same functions (``medcomp.stages.beyond``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from medcomp.costs import operation
from medcomp.evaluation import PeakMemory, answer_stats, generate_answers
from medcomp.files import content_hash
from medcomp.loading import checkpoint_identity, decoder_bytes, load_llava, load_processor, load_variant, tensor_bytes
from medcomp.quantizers import quantize
from medcomp.runs import Variant
from medcomp.stages.materialise import ensure
from medcomp.training import finetune_on_quantized
from medcomp.weight_analysis import finetune_survival


@dataclass(frozen=True)
class QuantizationStep:
    source: str  # the variant quantized
    method: str  # awq, rtn, bnb, gptq (08's), or qlora (nf4 base as trained on + unmerged adapter; 08's)
    role: str  # finetuned, pruned, recovered, recovered_magnitude

    @property
    def name(self) -> str:
        return f"{self.source}-{self.method}"


def quantization_plan(settings, variants: dict[str, Any], recovered: Sequence[str]) -> list[QuantizationStep]:
    """Every (model, method) cell asked for: ``settings`` lists methods per role (see
    ``params.QuantizationParams``); ``recovered`` are 04's variants, the first one the pipeline's model."""
    if "finetuned" not in variants:
        raise ValueError("no 'finetuned' variant registered: run 01_finetune first")
    magnitude = [name for name in recovered if name.endswith("-magnitude")]
    by_depth = [name for name in recovered if name not in magnitude]
    roles: list[tuple[str, str, Sequence[str]]] = [("finetuned", "finetuned", settings.finetuned)]
    if by_depth:
        roles.append((variants[by_depth[0]].parent, "pruned", settings.pruned))
    roles += [(name, "recovered", tuple(dict.fromkeys([*settings.recovered, *(settings.pipeline_ablations if index == 0 else ())])))
              for index, name in enumerate(by_depth)]
    roles += [(name, "recovered_magnitude", settings.recovered_magnitude) for name in magnitude]
    return [QuantizationStep(source, method, role) for source, role, methods in roles for method in methods]


def build_quantized(run, stage: str, step: QuantizationStep, conversations, test_examples, dtype: str, device: str,
                    group_size: int, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Quantize (or reuse), reload and check, measure, answer the test set (or reuse), register; and,
    where the source came from an SFT, measure how much of that SFT's weight change survived."""
    source = ensure(run, step.source)
    started = time.perf_counter()
    if step.method == "qlora":
        if source.parent is not None and source.extra.get("sft_base") == run.variant(source.parent).path:
            ensure(run, source.parent)  # the pruned model a recovered model's adapter sits on
        path, seconds = Path(source.extra["adapter"]), 0.0
        extra = {"format": "qlora", "sft_base": source.extra["sft_base"],
                 "identity": [list(i) for i in checkpoint_identity(path) + checkpoint_identity(source.extra["sft_base"])]}
        previous = run.variants().get(step.name)
        reused = previous is not None and previous.extra.get("identity") == extra["identity"] and run.has_answers(step.name)
    else:
        with operation(f"quantize ({step.name}): check, child process, search, save", "search", dtype):
            checkpoint = quantize(step.method, source.path, run.model_dir(stage, step.name), conversations, group_size, dtype, device)
        path, seconds, reused = checkpoint.path, checkpoint.seconds, checkpoint.reused and run.has_answers(step.name)
        extra = {"format": "int4" if step.method == "gptq" else step.method}
    variant = Variant(name=step.name, stage=stage, path=str(path), parent=source.name, layers_removed=source.layers_removed, bits=4,
                      parameters=source.parameters, notes=f"{step.method} 4-bit of {source.name}",
                      extra={**extra, "group_size": group_size, "quantize seconds": round(seconds, 1), "role": step.role,
                             **({"adapter": source.extra["adapter"]} if "adapter" in source.extra else {})})
    model = load_variant(variant, dtype, device)
    run.register_variant(variant)
    if reused:
        answers = run.answers(step.name)
    else:
        answers = generate_answers(model, load_processor(source.path), test_examples, max_new_tokens, batch_size,
                                   description=f"answering ({step.name})")
        run.save_answers(step.name, answers)
    survival = None
    if "adapter" in source.extra:
        with operation(f"survival analysis ({step.name})", "analysis"):
            merged = load_llava(source.path, dtype=dtype, device="cpu")  # the reference stays off the GPU, in the run's dtype (no fp32 7B)
            survival = finetune_survival(model, merged, source.extra["adapter"], group_size)
        del merged
    result = {"variant": step.name, "source": source.name, "method": step.method, "role": step.role, "fraction": source.extra.get("fraction"),
              "quantize seconds": seconds, "decoder bytes": decoder_bytes(model), "model bytes": tensor_bytes(model),
              **answer_stats(answers), "survival": survival, "seconds": time.perf_counter() - started}
    del model
    return result


def build_all(run, stage: str, plan: Sequence[QuantizationStep], conversations, test_examples, dtype: str, device: str, group_size: int,
              max_new_tokens: int, batch_size: int) -> list[dict[str, Any]]:
    """Every cell of the plan (``build_quantized``); one result per variant."""
    results = []
    for step in plan:
        result = build_quantized(run, stage, step, conversations, test_examples, dtype, device, group_size, max_new_tokens, batch_size)
        results.append(result)
        print(f"{step.name}: quantized in {result['quantize seconds']:.1f} s; decoder {result['decoder bytes'] / 1e6:.1f} MB; "
              f"naming {result['naming accuracy']:.1%}")
    return results


def recover_on_quantized(run, stage: str, quantized: str, train_examples, test_examples, params, device: str,
                         max_new_tokens: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Quantize first, then recover: 04's recovery SFT trained against the 4-bit variant ``quantized``
    (AWQ or RTN of a pruned model), the adapter kept unmerged. Registered as ``<quantized>-sft``."""
    base = run.variant(quantized)
    pruned = ensure(run, base.parent)
    name = f"{quantized}-sft"
    identity = [list(i) for i in checkpoint_identity(base.path)]
    setup = content_hash([identity, params.model_dump(mode="json"), [(e.image, e.question) for e in train_examples], seed], 16)
    previous = run.variants().get(name)
    started = time.perf_counter()
    if previous is not None and previous.extra.get("setup") == setup and run.has_answers(name):
        model, answers, seconds, peak = load_variant(previous, params.compute_dtype, device), run.answers(name), previous.extra["SFT seconds"], previous.extra.get("SFT peak", {})
    else:
        with PeakMemory() as memory:
            result = finetune_on_quantized(base.path, pruned.path, device, train_examples, params, run.stage_dir(stage) / name, seed)
        seconds, peak = result.train_seconds, memory.gib
        variant = Variant(name=name, stage=stage, path=str(result.adapter_dir), parent=quantized, layers_removed=base.layers_removed, bits=4,
                          parameters=base.parameters, notes=f"recovery SFT against {quantized}, adapter unmerged",
                          extra={"format": "adapter-on-quantized", "quantized_base": base.path, "setup": setup, "role": "quantize_then_recover",
                                 "SFT seconds": round(seconds, 1), "SFT peak": peak, "log_history": result.log_history})
        run.register_variant(variant)
        model = load_variant(variant, params.compute_dtype, device)
        answers = generate_answers(model, load_processor(pruned.path), test_examples, max_new_tokens, batch_size, description=f"answering ({name})")
        run.save_answers(name, answers)
    result = {"variant": name, "source": quantized, "method": f"{base.extra['format']} then SFT", "role": "quantize_then_recover",
              "quantize seconds": base.extra.get("quantize seconds", 0.0), "SFT seconds": seconds, **{f"SFT {k}": v for k, v in peak.items()},
              "decoder bytes": decoder_bytes(model), "model bytes": tensor_bytes(model), **answer_stats(answers), "survival": None,
              "seconds": time.perf_counter() - started, "log_history": run.variant(name).extra.get("log_history", [])}
    del model
    return result


def variant_measurements(run, name: str, results_by_name: dict[str, dict[str, Any]], dtype: str = "float32") -> dict[str, Any]:
    """What Table 4 shows of a variant: this stage's measurements if it made the variant, else the
    full-precision model loaded and measured, with naming from its saved answers."""
    variant = run.variant(name) if name in results_by_name else ensure(run, name)
    if name in results_by_name:
        return {**results_by_name[name], "parameters": variant.parameters, "bits": variant.bits}
    model = load_llava(variant.path, dtype=dtype)
    row = {"variant": name, "parameters": variant.parameters, "bits": variant.bits, "decoder bytes": decoder_bytes(model),
           "model bytes": tensor_bytes(model), **answer_stats(run.answers(name))}
    del model
    return row


def survival_frames(results: Sequence[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """Per quantized variant of an SFT'd model, its per-linear survival table (``finetune_survival``)."""
    return {r["variant"]: r["survival"] for r in results if r["survival"] is not None and not r["survival"].empty}


def survival_findings(frames: dict[str, pd.DataFrame], survival: pd.DataFrame, unquantized_naming: float) -> str:
    """What the survival tables say about the finetuned model, in Markdown: the SFT's change in 4-bit
    steps, and per method how much of it was kept."""
    if not frames:
        return ""
    ratio = pd.concat(frames.values())["delta / step"]
    below = pd.concat(frames.values())["below half a step"]
    lines = [f"On this run the finetune's weight change is a median **{ratio.median():.3f}** of a 4-bit step "
             f"({below.mean():.1%} of its entries below half a step)."]
    for method in ("bnb", "rtn", "awq", "qlora"):
        name = f"finetuned-{method}"
        if name in survival.index:
            lines.append(f"- `{name}`: kept {survival.loc[name, 'kept (median)']}, cosine {survival.loc[name, 'cosine (median)']}, "
                         f"naming {survival.loc[name, 'naming accuracy']} (unquantized: {unquantized_naming:.1%})")
    return "\n".join(lines)
