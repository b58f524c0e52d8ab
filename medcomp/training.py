"""QLoRA supervised finetuning of a LLaVA on VQA conversations (paper sections 3.1 and 3.3).

The loss covers answer tokens only (``medcomp.encoding``). LoRA adapters go on the language model's
linear layers; the projector (or the tower) can additionally train in full (``fully_trained_modules``),
as LLaVA-1.5's own finetune (stage 2) trains its projector. Three entry points share one body
(``_fit``): ``finetune`` (QLoRA, then an exact merge), ``finetune_on_quantized`` (LoRA on a 4-bit AWQ/RTN
model, kept unmerged) and ``train_modules_only`` (LLaVA's stage 1). Training runs through
``transformers.Trainer`` (one progress bar, checkpoints every ``save_steps``: an interrupted run resumes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from medcomp.costs import model_dtype, operation, training_flops
from medcomp.data import VQAConversation, VQAExample, as_multi_turn
from medcomp.distillation import Distillation, distillation_loss
from medcomp.encoding import LeftPadCollator, VQATrainingSet, answer_loss
from medcomp.files import atomic_write_json, content_hash
from medcomp.loading import (LM_HEAD, PROJECTOR, TORCH_DTYPES, VISION_TOWER, bnb_4bit_config, checkpoint_identity, import_gptqmodel_quietly,
                             load_llava, load_processor, load_quantized, save_with_processor)
from medcomp.params import FinetuneParams


def lora_config(params: FinetuneParams):
    from peft import LoraConfig

    targets = "|".join(params.lora.target_modules)
    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        # Only the language model: CLIP has q_proj/k_proj/v_proj too, and LLaVA recipes leave it alone.
        target_modules=rf".*language_model.*\.({targets})",
        modules_to_save=list(params.fully_trained_modules) or None,
        task_type="CAUSAL_LM",
    )


def qlora_quantization(params: FinetuneParams):
    """nf4 for the language model; the tower, projector and head stay in the model's dtype."""
    if params.quantization == "nf4":
        return bnb_4bit_config(params.compute_dtype, [VISION_TOWER, PROJECTOR, LM_HEAD])
    return None


def load_for_finetuning(source: str, model_dtype: str, device: str, params: FinetuneParams):
    """Base model (nf4 if asked) wrapped with LoRA adapters, ready for ``Trainer``."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    quantization = qlora_quantization(params)
    model = load_llava(source, dtype=model_dtype, device=device, quantization_config=quantization)
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=CHECKPOINTING)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    return get_peft_model(model, lora_config(params))


# torch.utils.checkpoint asks callers to choose: the reentrant variant is deprecated (a later torch raises without a
# choice) and drops gradients of inputs that do not require them, which a frozen LoRA base's embeddings are.
CHECKPOINTING = {"use_reentrant": False}


def _optimizer(model, params: FinetuneParams) -> torch.optim.Optimizer:
    adapter, full = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (adapter if "lora_" in name else full).append(parameter)
    groups = [group for group in ({"params": adapter, "lr": params.learning_rate}, {"params": full, "lr": params.modules_learning_rate}) if group["params"]]
    # fused: one ATen kernel whose sqrt is the CPU's IEEE instruction. The default (foreach) step takes the
    # square root through MKL's vector math, whose bits depend on the CPU vendor whatever MKL_CBWR says
    # (medcomp.numerics, "AdamW step" rows): the one family that parted Intel and AMD under `portable`.
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay, fused=True)


def _precision_flags(params: FinetuneParams, device: str) -> dict[str, bool]:
    mode = params.mixed_precision
    if mode == "auto":
        mode = {"float16": "fp16", "bfloat16": "bf16"}.get(params.compute_dtype, "no") if device == "cuda" else "no"
    return {"fp16": mode == "fp16", "bf16": mode == "bf16"}


def _one_progress_bar():
    """Training shows as one bar, its postfix the latest loss: no per-step table (the notebook
    callback draws one in a kernel) and no printed log dicts; the loss curve is plotted from
    ``log_history`` instead."""
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    class TrainingBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = tqdm(total=state.max_steps, desc="training", unit="step")
            self.current_step = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    return TrainingBar


def _resumed_state(checkpoints: Path) -> dict[str, Any]:
    """The trainer state ``train(resume_from_checkpoint=True)`` resumes from: the newest checkpoint's (none: empty)."""
    newest = max(checkpoints.glob("checkpoint-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]), default=None)
    state = newest / "trainer_state.json" if newest is not None else None
    return json.loads(state.read_text()) if state is not None and state.exists() else {}


def _answer_loss_trainer(distillation: Distillation | None = None):
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if distillation is None:
                loss = answer_loss(model, inputs, num_items_in_batch)
            else:
                loss = distillation_loss(model, inputs, distillation.targets, distillation.temperature, distillation.alpha, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return AnswerLossTrainer


def _checkpoints_for(output_dir: Path, setup: list[Any], examples: Sequence[VQAExample], params: FinetuneParams) -> Path:
    """The checkpoint folder, emptied if its checkpoints came from a different setup.

    Resuming is only right for the same model, data and settings; anything else starts afresh.
    """
    import shutil

    # what changes the training: not how often it logs or saves (changing those must not wipe the checkpoints)
    settings = params.model_dump(mode="json", exclude={"logging_steps", "save_steps"})
    examples_key = [(Path(e.image).parent.name, Path(e.image).name, repr(e.messages())) for e in examples]  # not the data root's path
    fingerprint = content_hash([*setup, settings, examples_key], 64)
    checkpoints = output_dir / "checkpoints"
    marker = checkpoints / "setup.sha256"
    if checkpoints.exists() and (not marker.exists() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return checkpoints


@dataclass
class FinetuneResult:
    adapter_dir: Path | None  # None when no adapter was trained (train_modules_only)
    merged_dir: Path
    log_history: list[dict[str, Any]]
    trainable_parameters: int
    total_parameters: int
    train_seconds: float
    steps: int

    @property
    def final_loss(self) -> float:
        """The last logged training loss (answer tokens), not the average over the run."""
        return next((entry["loss"] for entry in reversed(self.log_history) if "loss" in entry), float("nan"))

    @property
    def first_loss(self) -> float:
        return next((entry["loss"] for entry in self.log_history if "loss" in entry), float("nan"))


def _train(model, processor, examples: Sequence[VQAExample], params: FinetuneParams, output_dir: Path,
           setup: list[Any], device: str, seed: int, distillation: Distillation | None = None):
    """Run ``Trainer`` with the answer-only loss; resumes from this setup's checkpoints if any."""
    from transformers import TrainingArguments

    checkpoints = _checkpoints_for(output_dir, [*setup, *(distillation.describe() if distillation else [])], examples, params)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=params.epochs,
        max_steps=params.max_steps or -1,
        per_device_train_batch_size=params.batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        warmup_steps=params.warmup_ratio,  # a float below 1 is a fraction of all steps
        lr_scheduler_type="linear",
        logging_steps=params.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=1,
        report_to=[],
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # the cost table's work
        **_precision_flags(params, device),
    )
    trainer = _answer_loss_trainer(distillation)(
        model=model,
        args=args,
        train_dataset=VQATrainingSet(processor, examples, with_index=distillation is not None),
        data_collator=LeftPadCollator(processor.tokenizer.pad_token_id),
        optimizers=(_optimizer(model, params), None),
    )
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    trainer.remove_callback(NotebookProgressCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_one_progress_bar())
    started = time.perf_counter()
    resumed = _resumed_state(checkpoints)  # the cost table counts this call's work, not the checkpoint's again
    with operation(f"training ({Path(output_dir).name})", "training", model_dtype(model)) as work:
        trainer.train(resume_from_checkpoint=True if any(checkpoints.glob("checkpoint-*")) else None)
        work.tokens = int(trainer.state.num_input_tokens_seen - resumed.get("num_input_tokens_seen", 0))
        sequences = max((trainer.state.global_step - resumed.get("global_step", 0)) * params.batch_size * params.gradient_accumulation_steps, 1)
        work.flops = training_flops(model.config, work.tokens, context=work.tokens / sequences / 2)
    return trainer, time.perf_counter() - started


def _seed(seed: int) -> None:
    """Seed before the model is built: the LoRA initialisation draws random numbers before ``Trainer``
    seeds itself, so without this an adapter depended on whatever ran earlier in the process (the
    bootstrap, when 01 built it; 04's first recovery, for its second)."""
    from transformers import set_seed

    set_seed(seed)


def _parameter_counts(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def _fit(model, processor, examples: Sequence[VQAExample | VQAConversation], params: FinetuneParams, output_dir: Path,
         setup: list[Any], device: str, seed: int, save_to: Path, distillation: Distillation | None = None) -> FinetuneResult:
    """The body every entry point shares: count, train (resuming), save what was trained with its
    processor to ``save_to``, keep the log. The caller fills in what the saved folder is."""
    trainable, total = _parameter_counts(model)
    trainer, train_seconds = _train(model, processor, examples, params, output_dir, setup, device, seed, distillation)
    saved = save_with_processor(model, processor, save_to)
    atomic_write_json(output_dir / "log_history.json", trainer.state.log_history)
    return FinetuneResult(saved, saved, trainer.state.log_history, trainable, total, train_seconds, trainer.state.global_step)


def training_examples(examples: Sequence[VQAExample], params: FinetuneParams) -> Sequence[VQAExample | VQAConversation]:
    """What ``finetune`` trains on, in its order: the sequences distillation's teacher targets must cover."""
    return _conversations(examples, params)


def _conversations(examples: Sequence[VQAExample], params: FinetuneParams) -> Sequence[VQAExample | VQAConversation]:
    """With ``params.multi_turn`` each image's questions form one conversation (the paper's format):
    every sequence then teaches the image-to-name link, and no batch is padded to its longest single answer."""
    return as_multi_turn(examples) if params.multi_turn else examples


def finetune(
    source: str,
    model_dtype: str,
    device: str,
    train_examples: Sequence[VQAExample],
    params: FinetuneParams,
    output_dir: Path,
    seed: int = 0,
    merged_dir: Path | None = None,
    distillation: Distillation | None = None,
) -> FinetuneResult:
    """QLoRA-finetune ``source`` and save ``output_dir/adapter`` and the merged model (``merged_dir``,
    default ``output_dir/merged``; a scratch folder keeps the heavy copy out of the run folder). With
    ``distillation`` the loss is ``medcomp.distillation``'s, its targets built for ``training_examples(...)``."""
    import_gptqmodel_quietly()
    _seed(seed)
    output_dir = Path(output_dir)
    processor = load_processor(source)
    model = load_for_finetuning(source, model_dtype, device, params)
    result = _fit(model, processor, _conversations(train_examples, params), params, output_dir,
                  [checkpoint_identity(source), model_dtype, seed], device, seed, output_dir / "adapter", distillation)
    merged_dir = merge_adapter(source, result.adapter_dir, merged_dir or output_dir / "merged", model_dtype, qlora_quantization(params))
    return replace(result, merged_dir=merged_dir)


def finetune_on_quantized(
    quantized_source: str,
    processor_source: str,
    device: str,
    train_examples: Sequence[VQAExample],
    params: FinetuneParams,
    output_dir: Path,
    seed: int = 0,
) -> FinetuneResult:
    """Train LoRA adapters against an already 4-bit (AWQ/RTN GEMM) checkpoint and keep them unmerged:
    "quantize first, then recover". peft wraps GPTQModel's AWQ layers (``AwqLoraLinear``); the adapter
    learns to correct the very rounding it will be served with. ``merged_dir`` is the quantized base.
    """
    from peft import get_peft_model

    _seed(seed)
    output_dir = Path(output_dir)
    processor = load_processor(processor_source)
    base = load_quantized(quantized_source, device, params.compute_dtype)
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    model = get_peft_model(base, lora_config(params))
    result = _fit(model, processor, _conversations(train_examples, params), params, output_dir,
                  [checkpoint_identity(quantized_source), "quantized", seed], device, seed, output_dir / "adapter")
    return replace(result, merged_dir=Path(quantized_source))


def visited_indices(count: int, params: FinetuneParams, seed: int) -> list[int]:
    """The training-set indices ``_train``'s Trainer draws, in order, over ``params``' steps: accelerate's seedable
    sampler with ``data_seed=seed``, epoch after epoch, as Trainer runs it. A teacher pass then covers only what the
    student will see (a 20-step recovery sees 160 of 2,400 sequences). Tested against the Trainer's own draws."""
    import math

    from accelerate.data_loader import SeedableRandomSampler

    per_step = params.batch_size * params.gradient_accumulation_steps
    needed = params.max_steps * per_step if params.max_steps else math.ceil(count * params.epochs)
    sampler, order = SeedableRandomSampler(range(count), data_seed=seed), []
    while len(order) < needed:
        order += list(sampler)  # a full pass moves the sampler to its next epoch, as Trainer's does
    return order[:needed]


def train_prepared(model, processor, train_examples: Sequence[VQAExample], params: FinetuneParams, output_dir: Path, setup: list[Any],
                   device: str, seed: int = 0, distillation: Distillation | None = None) -> tuple[list[dict[str, Any]], float, int]:
    """Train whatever of ``model`` requires grad, with this module's loop (answer-only loss, one bar, fused
    AdamW, resumable); the caller built the model and saves it. Returns log history, seconds and steps."""
    trainer, seconds = _train(model, processor, _conversations(train_examples, params), params, Path(output_dir), setup, device, seed, distillation)
    atomic_write_json(Path(output_dir) / "log_history.json", trainer.state.log_history)
    return trainer.state.log_history, seconds, trainer.state.global_step


_MODULE_PREFIXES = {"vision_tower": VISION_TOWER, "multi_modal_projector": PROJECTOR}


def train_modules_only(
    source: str,
    model_dtype: str,
    device: str,
    train_examples: Sequence[VQAExample],
    params: FinetuneParams,
    output_dir: Path,
    seed: int = 0,
    target_dir: Path | None = None,
) -> FinetuneResult:
    """Train only ``params.fully_trained_modules`` in full, everything else frozen: LLaVA's stage 1.

    Used by ``pretraining.build_pretrained_embedded_llava`` (projector learns to caption). The model
    is loaded unquantized whatever ``params.quantization`` says: the frozen part is what later
    stages start from, and rounding it would change it. No adapter is involved, so the model is
    saved as it is, to ``target_dir`` (default ``output_dir/merged``).
    """
    _seed(seed)
    output_dir = Path(output_dir)
    processor = load_processor(source)
    model = load_llava(source, dtype=model_dtype, device=device)
    trained_prefixes = tuple(_MODULE_PREFIXES[name] + "." for name in params.fully_trained_modules)
    if not trained_prefixes:
        raise ValueError("train_modules_only needs fully_trained_modules; there is nothing to train")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trained_prefixes))
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    result = _fit(model, processor, train_examples, params, output_dir, [checkpoint_identity(source), model_dtype, seed, "modules"], device, seed,
                  target_dir or output_dir / "merged")
    return replace(result, adapter_dir=None)


def merge_adapter(
    base_source: str,
    adapter_dir: Path,
    merged_dir: Path,
    dtype: str,
    quantization_config: Any = None,
) -> Path:
    """Fold the adapter into plain (unquantized) weights and ``save_pretrained`` the result.

    With QLoRA the adapter was trained against the nf4-rounded base, so the base is loaded the same
    way and dequantized before merging: the merged model computes what was trained. Merging into
    the original full-precision weights instead changes every layer by the nf4 rounding error,
    which is large on a small model.
    """
    from peft import PeftModel

    import_gptqmodel_quietly()
    base = load_llava(base_source, dtype=dtype, device="cpu", quantization_config=quantization_config)
    if quantization_config is not None:
        base = base.dequantize(dtype=TORCH_DTYPES[dtype])
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # deterministic: the same adapter merged into the same base the same way is the same checkpoint, rebuilt or not
    write_id = content_hash(["merge", checkpoint_identity(base_source), checkpoint_identity(adapter_dir), dtype,
                             quantization_config.to_dict() if quantization_config is not None else None], 32)
    return save_with_processor(merged, load_processor(str(adapter_dir)), merged_dir, write_id)
