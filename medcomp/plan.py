"""Memory, time and disk plans for a run on Kaggle's T4s, computed from the model's config before any stage runs.

A T4 has 16 GB (15.1 GiB usable): every stage must peak at or below ``T4_BUDGET_GIB`` of allocated memory
on each GPU; with ``model.gpus: 2`` (Kaggle's "GPU T4 x2") the model is split as ``medcomp.placement``
loads it, and each GPU's peak is planned. The plan is built from the model's own config (``llava-1.5-7b-hf``'s
ships in ``medcomp/reference``) instantiated on the **meta** device. Per stage it adds up: the weights by
dtype and bit width (4-bit linears with their group scales and zeros); the KV cache (2 x layers x batch x
tokens x KV heads x head dim x 2 bytes); training activations with gradient checkpointing (each layer's
input kept, one layer recomputed: Korthikanti et al. 2022's 34 s b h bytes, plus the answers' fp32 logits);
LoRA's parameters, gradients and AdamW's two moments (16 bytes a parameter).

``batch_size: auto`` resolves to the largest generation batch whose plan fits (``auto_batch_size``). Times
are T4 estimates from token and step counts and the paper's own rates: 154 ms per generated token (Table 4)
and 2 h 42 min for one recovery-SFT epoch of the 25-layer model (Table 2). Estimates, and every table says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from medcomp.backends import candidates
from medcomp.placement import Parts, balanced_layers, gpu_peaks
from medcomp.paper import TABLE_2, TABLE_4

REFERENCE = Path(__file__).resolve().parent / "reference"
REAL_MODEL_ID = "llava-hf/llava-1.5-7b-hf"
GIB = 2**30
T4_BUDGET_GIB = 14.5
T4_SECONDS_PER_TOKEN = float(TABLE_4.loc["Original LLaVA", "latency (ms/token)"]) / 1000
# Table 2: one recovery-SFT epoch of the "5.6B" model (25 of 32 layers) on the paper's 1,737 training images.
_PAPER_SFT_MINUTES = 2 * 60 + 42
T4_SFT_SECONDS_PER_CONVERSATION_LAYER = _PAPER_SFT_MINUTES * 60 / 1737 / 25
# Not measured by the paper or by us: AWQ's scale and clip search on a 7B model (AutoAWQ reports about
# 10-15 minutes on an A100); a T4 is assumed 2-3x slower. Shown as an assumption wherever used.
T4_AWQ_SECONDS_PER_LAYER = 50.0
T4_FP32_FLOP_S = 4e12  # half the T4's 8.1 TFLOP/s fp32 peak: an assumption, as the rates above
PROMPT_TOKENS = 48  # chat template + one question, llava-1.5's tokenizer (measured on the test questions: 30-45)
T4_CAPABILITY = (7, 5)
T4_AWQ_KERNEL = candidates("cuda", T4_CAPABILITY)[0][0]  # the AWQ/RTN kernel a T4 serves with (medcomp.backends)
KAGGLE_OUTPUT_GIB = 19.5  # /kaggle/working keeps about 20 GB between sessions


def real_config() -> dict[str, Any]:
    """``llava-hf/llava-1.5-7b-hf``'s config.json, as shipped with medcomp (no hub needed)."""
    return json.loads((REFERENCE / "llava-1.5-7b-hf.config.json").read_text())


def config_for(model_id: str) -> dict[str, Any] | None:
    """The config of the model a run starts from: a local checkpoint's, the shipped one for the real
    model, None when it is not known before the run (a hub model other than llava-1.5-7b, or an
    embedded model not yet built)."""
    path = Path(model_id) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    if model_id == REAL_MODEL_ID:
        return real_config()
    return None


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    image_tokens: int
    decoder_linear_params_per_layer: int
    decoder_other_params_per_layer: int  # the two RMSNorms
    outside_decoder_params: int  # embeddings, final norm, lm_head, vision tower, projector

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self, layers_removed: int = 0) -> int:
        per_layer = self.decoder_linear_params_per_layer + self.decoder_other_params_per_layer
        return self.outside_decoder_params + (self.layers - layers_removed) * per_layer


@lru_cache(maxsize=8)
def _shape_from_json(config_json: str) -> ModelShape:
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(**json.loads(config_json))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    text, vision = config.text_config, config.vision_config
    layer = model.model.language_model.layers[0]
    linear = sum(p.numel() for name, p in layer.named_parameters() if name.endswith("proj.weight"))
    other = sum(p.numel() for p in layer.parameters()) - linear
    total = sum(p.numel() for p in model.parameters())
    return ModelShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.num_attention_heads,
                      text.num_key_value_heads or text.num_attention_heads, text.vocab_size,
                      (vision.image_size // vision.patch_size) ** 2, linear, other, total - text.num_hidden_layers * (linear + other))


def shape_of(config: dict[str, Any]) -> ModelShape:
    """The model's shape, its parameters counted on the meta device (nothing allocated)."""
    return _shape_from_json(json.dumps(config, sort_keys=True))


def weight_bytes(shape: ModelShape, bits: int = 16, layers_removed: int = 0, group_size: int = 64, method: str = "awq") -> int:
    """Bytes of the weights in fp16, or with the decoder's linears in 4 bits: AWQ/RTN GEMM (fp16 scale and
    4-bit zero per group) or bitsandbytes nf4 (an 8-bit absmax per 64, double-quantized)."""
    layers = shape.layers - layers_removed
    full = 2 * (shape.outside_decoder_params + layers * shape.decoder_other_params_per_layer)
    linear = layers * shape.decoder_linear_params_per_layer
    if bits == 16:
        return full + 2 * linear
    per_weight = 0.5 + ((2 + 0.5) / group_size if method in ("awq", "rtn") else 1 / 64 + 4 / (64 * 256))
    return full + math.ceil(linear * per_weight)


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, layers_removed: int = 0, dtype_bytes: int = 2) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``tokens`` tokens."""
    return 2 * (shape.layers - layers_removed) * batch * tokens * shape.kv_heads * shape.head_dim * dtype_bytes


def prefill_activation_bytes(shape: ModelShape, batch: int, tokens: int, dtype_bytes: int = 2) -> int:
    """The largest transient of a prefill: one layer's MLP (gate, up, their product) and its attention
    scores (eager attention; SDPA needs less), plus the last position's fp32 logits."""
    mlp = 3 * batch * tokens * shape.intermediate * dtype_bytes
    scores = batch * shape.heads * tokens * tokens * dtype_bytes
    return mlp + scores + batch * shape.vocab * 4


def lora_parameters(shape: ModelShape, rank: int, targets: tuple[str, ...], layers_removed: int = 0) -> int:
    """LoRA's trainable parameters: r x (in + out) for each targeted linear of each layer."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return (shape.layers - layers_removed) * sum(rank * sum(dims[t]) for t in targets if t in dims)


def training_activation_bytes(shape: ModelShape, batch: int, tokens: int, answer_tokens: int, layers_removed: int = 0,
                              checkpointing: bool = True) -> int:
    """Activations kept for the backward pass. With checkpointing: each layer's input (2 s b h bytes)
    plus one layer recomputed with its gradients (34 s b h + 5 a s^2 b bytes, Korthikanti et al.);
    without, every layer's. Plus the answer tokens' fp32 logits and their gradient."""
    layers = shape.layers - layers_removed
    one_layer = 34 * tokens * batch * shape.hidden + 5 * shape.heads * tokens * tokens * batch
    kept = layers * 2 * tokens * batch * shape.hidden + one_layer if checkpointing else layers * one_layer
    return kept + 2 * batch * answer_tokens * shape.vocab * 4


@dataclass(frozen=True)
class StagePlan:
    stage: str
    step: str  # the stage's largest step
    terms: dict[str, int]  # bytes
    batch_size: int
    seconds: float  # T4 estimate
    how: str  # what the time estimate rests on
    gpus: tuple[int, ...] = ()  # blocks per GPU when the model spans several (medcomp.placement); () for one GPU
    parts: Parts | None = None  # the model's parts as this step holds them (bits, blocks removed)
    bits: int = 16

    @property
    def gpu_peaks(self) -> list[float]:
        """Each GPU's planned peak (one entry on one GPU)."""
        if len(self.gpus) < 2 or self.parts is None:
            return [float(sum(self.terms.values()))]
        return gpu_peaks(self.terms, self.parts, self.gpus, self.bits)

    @property
    def peak_bytes(self) -> int:
        """The fullest GPU's planned peak."""
        return int(max(self.gpu_peaks))

    def fits(self, budget_gib: float = T4_BUDGET_GIB) -> bool:
        return self.peak_bytes <= budget_gib * GIB


def generation_plan(shape: ModelShape, batch: int, new_tokens: int, bits: int = 16, layers_removed: int = 0, method: str = "awq") -> dict[str, int]:
    tokens = shape.image_tokens + PROMPT_TOKENS + new_tokens
    return {"weights": weight_bytes(shape, bits, layers_removed, method=method), "KV cache": kv_cache_bytes(shape, batch, tokens, layers_removed),
            "prefill activations": prefill_activation_bytes(shape, batch, shape.image_tokens + PROMPT_TOKENS)}


def shape_parts(shape: ModelShape, layers_removed: int = 0) -> Parts:
    """The shape as ``medcomp.placement`` splits it: the lm_head and final norm go last, the rest outside the
    decoder (tower, projector, embeddings) first."""
    last = shape.vocab * shape.hidden + shape.hidden
    return Parts(shape.outside_decoder_params - last, shape.decoder_linear_params_per_layer + shape.decoder_other_params_per_layer,
                 shape.decoder_linear_params_per_layer, last, shape.layers - layers_removed)


def spread(plan: StagePlan, shape: ModelShape, gpus: int, bits: int = 16, layers_removed: int = 0) -> StagePlan:
    """``plan`` with the model split over ``gpus`` GPUs as the run will load it (``placement.balanced_layers``)."""
    if gpus < 2:
        return plan
    parts = shape_parts(shape, layers_removed)
    return replace(plan, gpus=balanced_layers(*parts.part_bytes(bits), parts.layers, gpus), parts=parts, bits=bits)


def auto_batch_size(shape: ModelShape, new_tokens: int, bits: int = 16, layers_removed: int = 0, largest: int = 16,
                    budget_gib: float = T4_BUDGET_GIB, gpus: int = 1) -> int:
    """The largest generation batch (at most ``largest``) whose plan fits ``budget_gib`` on every GPU; at least 1."""
    for batch in range(largest, 0, -1):
        plan = StagePlan("", "", generation_plan(shape, batch, new_tokens, bits, layers_removed), batch, 0.0, "")
        if spread(plan, shape, gpus, bits, layers_removed).fits(budget_gib):
            return batch
    return 1


def resolved_batch_size(configured: int | str, shape: ModelShape | None, new_tokens: int, bits: int = 16, layers_removed: int = 0,
                        cpu_default: int = 8, gpus: int = 1) -> int:
    """A params ``batch_size``: a number as given; ``auto`` from the plan (``cpu_default`` when the
    model's shape is not known before the run)."""
    if configured != "auto":
        return int(configured)
    return auto_batch_size(shape, new_tokens, bits, layers_removed, gpus=gpus) if shape is not None else cpu_default


def _answers(params) -> int:
    return params.data.test_images * 3


def _training_conversations(params) -> int:
    """Training sequences per epoch: the paper's 1,737 DermNet training images (one multi-turn
    conversation each, or three single-turn ones), capped by ``max_train_images_per_disease``."""
    images = 1737 if params.data.max_train_images_per_disease is None else min(1737, params.data.max_train_images_per_disease * len(params.data.diseases))
    return images if params.finetune.multi_turn else 3 * images


def _sft_plan(stage: str, step: str, shape: ModelShape, settings, answer_tokens: int, conversations: int, layers_removed: int,
              generation_batch: int, new_tokens: int, answers: int) -> StagePlan:
    tokens = shape.image_tokens + (3 if settings.multi_turn else 1) * (PROMPT_TOKENS + answer_tokens)
    trainable = lora_parameters(shape, settings.lora.r, settings.lora.target_modules, layers_removed)
    terms = {"weights (nf4 base)": weight_bytes(shape, 4, layers_removed, method="nf4"),
             "LoRA weights, gradients, AdamW moments (fp32)": 16 * trainable,
             f"activations (batch {settings.batch_size}, {tokens} tokens, checkpointing {'on' if settings.gradient_checkpointing else 'off'})":
                 training_activation_bytes(shape, settings.batch_size, tokens, answer_tokens, layers_removed, settings.gradient_checkpointing)}
    steps = settings.max_steps * settings.batch_size * settings.gradient_accumulation_steps if settings.max_steps else conversations * settings.epochs
    sft = steps * (shape.layers - layers_removed) * T4_SFT_SECONDS_PER_CONVERSATION_LAYER
    answering = math.ceil(answers / generation_batch) * new_tokens * T4_SECONDS_PER_TOKEN
    return StagePlan(stage, step, terms, settings.batch_size, sft + answering,
                     f"{steps:.0f} conversations x {shape.layers - layers_removed} layers at Table 2's rate; {answers} answers in batches of {generation_batch}")


def stage_plans(params, shape: ModelShape) -> list[StagePlan]:
    """Each stage's largest step on a T4: its memory terms, its batch size, and a time estimate."""
    from medcomp.pruning import levels_for_depth, prunable_layers

    evaluation, importance, answers = params.evaluation, params.importance, _answers(params)
    gpus = params.model.gpus
    gen_batch = resolved_batch_size(evaluation.batch_size, shape, evaluation.max_new_tokens, gpus=gpus)
    imp_batch = resolved_batch_size(importance.batch_size, shape, importance.max_new_tokens, gpus=gpus)
    removable = prunable_layers(shape.layers, importance.protect_first, importance.protect_last)
    levels = levels_for_depth(params.pruning.levels, shape.layers, len(removable))
    recovered = levels_for_depth(params.recovery.levels, shape.layers, len(removable))
    least_removed = min((count for _, count in recovered), default=0)

    def answering(batches_of: int, tokens: int, count: int) -> float:
        return math.ceil(count / batches_of) * tokens * T4_SECONDS_PER_TOKEN

    on = lambda plan, bits=16, removed=0: spread(plan, shape, gpus, bits, removed)  # noqa: E731  as the run loads it: over the GPUs

    plans = [on(_sft_plan("01_finetune", "QLoRA SFT of the full model", shape, params.finetune, evaluation.max_new_tokens,
                          _training_conversations(params), 0, gen_batch, evaluation.max_new_tokens, answers), bits=4)]
    plans.append(on(StagePlan("01_finetune", "answering the test set (merged fp16 model)",
                              generation_plan(shape, gen_batch, evaluation.max_new_tokens), gen_batch, 0.0, "counted in the SFT row")))
    sweep = (len(removable) + 1) * answering(imp_batch, importance.max_new_tokens, importance.calibration_size)
    plans.append(on(StagePlan("02_layer_importance", "prune-one-block sweep (fp16)", generation_plan(shape, imp_batch, importance.max_new_tokens),
                              imp_batch, sweep, f"{len(removable) + 1} passes of {importance.calibration_size} answers x {importance.max_new_tokens} tokens")))
    pruned = [count for _, count in levels if count] + ([dict(levels).get(params.pruning.magnitude_level, 0)] if params.pruning.magnitude_level else [])
    plans.append(on(StagePlan("03_prune", "answering with the least-pruned model (fp16)",
                              generation_plan(shape, gen_batch, evaluation.max_new_tokens, layers_removed=min(pruned, default=0)), gen_batch,
                              len(pruned) * answering(gen_batch, evaluation.max_new_tokens, answers), f"{len(pruned)} levels x {answers} answers"),
                    removed=min(pruned, default=0)))
    recoveries = len(recovered) + int(params.recovery.magnitude)
    sft = _sft_plan("04_sft_pruned", "recovery SFT of the least-pruned level", shape, params.recovery.finetune, evaluation.max_new_tokens,
                    _training_conversations(params), least_removed, gen_batch, evaluation.max_new_tokens, answers)
    plans.append(on(StagePlan(sft.stage, sft.step, sft.terms, sft.batch_size, recoveries * sft.seconds, f"{recoveries} recoveries; each " + sft.how),
                    bits=4, removed=least_removed))
    quantization = params.quantization
    awq_models = len(quantization.finetuned) + len(quantization.pruned) + len(recovered) * len(quantization.recovered) \
        + len(quantization.pipeline_ablations) + len(quantization.recovered_magnitude)
    q_batch = auto_batch_size(shape, evaluation.max_new_tokens, bits=4, gpus=gpus) if evaluation.batch_size == "auto" else gen_batch
    plans.append(StagePlan("05_quantize", "AWQ search (GPTQModel, layer by layer: the fp16 model off the GPU, one layer on it)",
                           {"one fp16 decoder layer": 2 * (shape.decoder_linear_params_per_layer + shape.decoder_other_params_per_layer),
                            "the layer's calibration inputs and outputs (fp16)": 2 * quantization.calibration_size * (shape.image_tokens + PROMPT_TOKENS + evaluation.max_new_tokens) * shape.hidden * 2,
                            "one conversation's MLP transient": prefill_activation_bytes(shape, 1, shape.image_tokens + PROMPT_TOKENS + evaluation.max_new_tokens),
                            "4-bit layers done so far": weight_bytes(shape, 4) - weight_bytes(shape, 4, shape.layers)},
                           1, awq_models * shape.layers * T4_AWQ_SECONDS_PER_LAYER + awq_models * answering(q_batch, evaluation.max_new_tokens, answers),
                           f"{awq_models} quantized models x {shape.layers} layers at an assumed {T4_AWQ_SECONDS_PER_LAYER:.0f} s a layer, plus their answers"))
    plans.append(on(StagePlan("05_quantize", f"answering with a 4-bit model ({T4_AWQ_KERNEL} kernel on a T4)",
                              generation_plan(shape, q_batch, evaluation.max_new_tokens, bits=4), q_batch, 0.0, "counted in the AWQ row"), bits=4))
    awq_row = next(p for p in plans if p.stage == "05_quantize")
    if params.beyond.gptq:  # 08's GPTQ: GPTQModel's layer-by-layer loop, as the AWQ search, plus the Hessian of the widest input
        searched = 1 + bool(recovered) + bool(recovered and params.beyond.replacement_steps)  # finetuned, recovered, the replaced model
        plans.append(replace(awq_row, stage="08_beyond", step="GPTQ (GPTQModel, layer by layer)", seconds=searched * awq_row.seconds / max(awq_models, 1),
                             terms={**awq_row.terms, "GPTQ Hessian of the widest input (fp32)": 4 * shape.intermediate ** 2},
                             how=f"{searched} models x {shape.layers} layers at the AWQ rate, plus their answers"))
    b = params.beyond
    grid_trainings = (b.qalora + b.lora_on_grid) * (1 + bool(recovered)) + bool(b.qalora and b.distill_from and recovered)
    if grid_trainings:  # 08: 04's SFT plan on the int4 grid (AWQ's bytes), plus one linear dequantized at a time (forward and backward)
        grid = _sft_plan("08_beyond", "adapters trained on the finetuned model's 4-bit grid", shape, b.recipe or params.recovery.finetune,
                         evaluation.max_new_tokens, _training_conversations(params), 0, q_batch, evaluation.max_new_tokens, answers)
        terms = {("weights (int4 grid)" if "nf4" in k else k): (weight_bytes(shape, 4, method="awq") if "nf4" in k else v) for k, v in grid.terms.items()}
        terms["one linear dequantized (fp16)"] = 2 * shape.hidden * shape.intermediate
        plans.append(StagePlan(grid.stage, grid.step + " (one GPU: int4 loads unsplit)", terms, grid.batch_size, grid_trainings * grid.seconds,
                               f"{grid_trainings} trainings; each " + grid.how))
    distilled = len(b.distill_alphas) * bool(b.distill_from and recovered) + bool(b.iterative_pruning and recovered) + bool(b.replacement_steps and recovered)
    if b.replacement_steps and recovered:  # 08: LLM-Streamline's one block trained alone in fp32, the fp16 model off the GPU
        tokens = shape.image_tokens + PROMPT_TOKENS + evaluation.max_new_tokens
        block = shape.decoder_linear_params_per_layer + shape.decoder_other_params_per_layer
        plans.append(StagePlan("08_beyond", "LLM-Streamline: one block trained on the run's recorded hidden states (fp32, one GPU)",
                               {"one decoder block, gradients, Adam moments (fp32)": 16 * block,
                                f"the run's input and output, batch {imp_batch} (fp32)": 2 * imp_batch * tokens * shape.hidden * 4,
                                "the block's activations for the backward (fp32)": 2 * (34 * tokens * imp_batch * shape.hidden + 5 * shape.heads * tokens ** 2 * imp_batch)},
                               imp_batch, b.replacement_steps * 6 * block * imp_batch * tokens / T4_FP32_FLOP_S,
                               f"{b.replacement_steps} steps x {imp_batch} sequences of {tokens} tokens at an assumed {T4_FP32_FLOP_S / 1e12:.0f} TFLOP/s"))
    if distilled:  # 08: the teacher's pass alone (nf4 if distill_from names the QLoRA deployment), then recoveries planned as 04's
        recipe = b.recipe or params.recovery.finetune  # the teacher sees only the sequences the recovery's steps draw
        conversations = _training_conversations(params)
        if recipe.max_steps:
            conversations = min(conversations, recipe.max_steps * recipe.batch_size * recipe.gradient_accumulation_steps)
        teacher_bits = 4 if b.distill_from and b.distill_from.endswith("qlora") else 16
        plans.append(on(StagePlan("08_beyond", f"the teacher's top-{b.distill_top_k} pass ({b.distill_from}, alone on the GPUs)",
                                  {k: v for k, v in generation_plan(shape, 4, evaluation.max_new_tokens, bits=teacher_bits, method="nf4").items() if k != "KV cache"},
                                  4, conversations * (shape.image_tokens + PROMPT_TOKENS + evaluation.max_new_tokens) * T4_SECONDS_PER_TOKEN / 64,
                                  f"{conversations} sequences, prefill only (an assumed 64 tokens per generated token's time)"), bits=teacher_bits))
        plans.append(on(StagePlan("08_beyond", f"{distilled} recoveries as 04's (distilled, SLEB, LLM-Streamline)", sft.terms, sft.batch_size, distilled * sft.seconds, sft.how),
                        bits=4, removed=least_removed))
    bench = params.benchmark
    plans.append(on(StagePlan("06_benchmark", "one fp16 variant resident, batch 1", generation_plan(shape, 1, bench.new_tokens), 1,
                              (awq_models + len(levels) + recoveries + 4 + grid_trainings + 2 * distilled) * (bench.warmup + bench.repeats + 1) * bench.new_tokens * T4_SECONDS_PER_TOKEN,
                              "every variant: warm-up, hooked run and timed runs of the forced tokens")))
    plans.append(StagePlan("07_judge", "the judge runs elsewhere (vLLM); this GPU holds nothing", {}, 0, 0.0, "depends on the judge's server"))
    return plans


def plans_table(plans: list[StagePlan], budget_gib: float = T4_BUDGET_GIB):
    """The plans as a table: GiB per term, the peak against the budget, the batch, the T4 hours."""
    import pandas as pd

    rows = []
    for plan in plans:
        rows.append({"stage": plan.stage, "largest step": plan.step, "batch": plan.batch_size,
                     "terms (GiB)": "; ".join(f"{name} {value / GIB:.2f}" for name, value in plan.terms.items()) or "—",
                     "planned peak (GiB)": round(plan.peak_bytes / GIB, 2), f"fits {budget_gib} GiB": plan.fits(budget_gib),
                     "per GPU (GiB)": " / ".join(f"{peak / GIB:.2f}" for peak in plan.gpu_peaks),
                     "blocks per GPU": " / ".join(map(str, plan.gpus)) or "all",
                     "T4 estimate (h)": round(plan.seconds / 3600, 2) if plan.seconds else "—", "estimate rests on": plan.how})
    return pd.DataFrame(rows).set_index(["stage", "largest step"])


def shape_for_params(params) -> ModelShape | None:
    """The shape of the model ``params`` start from, when its config is known before the run."""
    config = config_for(params.model.id)
    return shape_of(config) if config is not None else None


def with_batch_sizes(params):
    """``params`` with each ``batch_size: auto`` replaced by the largest batch the T4 plan fits (the
    unpruned fp16 model: the largest a stage answers with), or 8 when the shape is not known yet."""
    shape = shape_for_params(params)
    evaluation = resolved_batch_size(params.evaluation.batch_size, shape, params.evaluation.max_new_tokens, gpus=params.model.gpus)
    importance = resolved_batch_size(params.importance.batch_size, shape, params.importance.max_new_tokens, gpus=params.model.gpus)
    return params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"batch_size": evaluation}),
                                     "importance": params.importance.model_copy(update={"batch_size": importance})})
