"""QLoRA supervised finetuning of a LLaVA on VQA conversations (paper sections 3.1 and 3.3).

The loss covers answer tokens only. LoRA adapters go on the language model's linear layers; the
vision tower and projector can additionally train in full (``fully_trained_modules``), which the
embedded model needs because its tower starts random. Training runs through ``transformers.Trainer``
(progress bar, checkpoints every ``save_steps``: an interrupted run resumes from the last one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from medcomp.data import VQAExample, load_rgb
from medcomp.files import atomic_directory, atomic_write_json, content_hash
from medcomp.models import LM_HEAD, PROJECTOR, TORCH_DTYPES, VISION_TOWER, bnb_4bit_config, load_llava, load_processor
from medcomp.params import FinetuneParams

IGNORE_INDEX = -100


def _import_gptqmodel_quietly() -> None:
    """peft imports gptqmodel (when installed) on first use, and gptqmodel prints a start-up banner
    to stdout on import; importing it here first keeps that banner out of every report."""
    import contextlib
    import importlib.util
    import io

    if importlib.util.find_spec("gptqmodel") is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import gptqmodel  # noqa: F401


_import_gptqmodel_quietly()


def encode_for_training(processor, example: VQAExample) -> dict[str, torch.Tensor]:
    """Tokenise one (image, question, answer) with labels on the answer tokens only.

    The prompt is rendered by the processor's own chat template, with and without the answer; the
    answer span is the difference. Prefix consistency is checked, not assumed.
    """
    prompt_text = processor.apply_chat_template(example.prompt_messages(), add_generation_prompt=True)
    full_text = processor.apply_chat_template(example.messages())
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    image = load_rgb(example.image)
    full = processor(text=full_text, images=image, return_tensors="pt")
    prompt_ids = processor(text=prompt_text, images=image, return_tensors="pt")["input_ids"][0]
    input_ids = full["input_ids"][0]
    if not torch.equal(input_ids[: len(prompt_ids)], prompt_ids):
        raise ValueError("tokenising the prompt alone gives different tokens than inside the conversation")
    attention_mask = full["attention_mask"][0]
    eos_id = processor.tokenizer.eos_token_id
    if eos_id is not None and processor.tokenizer.eos_token not in full_text[len(prompt_text) :]:
        # Some templates (llava-1.5's) end the assistant turn without EOS; a model that never sees
        # one never learns to stop.
        input_ids = torch.cat([input_ids, torch.tensor([eos_id])])
        attention_mask = torch.cat([attention_mask, torch.tensor([1])])
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": full["pixel_values"][0],
        "labels": labels,
    }


class VQATrainingSet(Dataset):
    def __init__(self, processor, examples: Sequence[VQAExample]):
        self.processor = processor
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return encode_for_training(self.processor, self.examples[index])


@dataclass
class LeftPadCollator:
    """Left padding puts every answer at the end of its row, so the loss needs logits for the last
    ``answer_span`` positions only: at a 49k-token vocabulary that is a large share of the compute."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(row[key], (length - len(row[key]), 0), value=value) for row in rows])

        attention_mask = pad("attention_mask", 0)
        labels = pad("labels", IGNORE_INDEX)
        first_label = (labels != IGNORE_INDEX).float().argmax(dim=1)
        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            "labels": labels,
            "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
            "answer_span": length - int(first_label.min()) + 1,
        }


def answer_loss(model, batch: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over answer tokens, computing logits only where needed.

    Averaged over ``num_items`` answer tokens when given (the whole accumulated batch, as Trainer
    counts them), else over this batch's answer tokens.
    """
    batch = dict(batch)
    labels, span = batch.pop("labels"), int(batch.pop("answer_span"))
    logits = model(**batch, logits_to_keep=span, use_cache=False).logits  # predicts the last span-1 tokens
    targets = labels[:, -(span - 1) :]
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items if num_items is not None else (targets != IGNORE_INDEX).sum()
    return total / count


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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return get_peft_model(model, lora_config(params))


def _optimizer(model, params: FinetuneParams) -> torch.optim.Optimizer:
    adapter, full = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (adapter if "lora_" in name else full).append(parameter)
    groups = [group for group in ({"params": adapter, "lr": params.learning_rate}, {"params": full, "lr": params.modules_learning_rate}) if group["params"]]
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay)


def _precision_flags(params: FinetuneParams, device: str) -> dict[str, bool]:
    mode = params.mixed_precision
    if mode == "auto":
        mode = {"float16": "fp16", "bfloat16": "bf16"}.get(params.compute_dtype, "no") if device == "cuda" else "no"
    return {"fp16": mode == "fp16", "bf16": mode == "bf16"}


def _answer_loss_trainer():
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = answer_loss(model, inputs, num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return AnswerLossTrainer


def _checkpoints_for(output_dir: Path, setup: list[Any], examples: Sequence[VQAExample], params: FinetuneParams) -> Path:
    """The checkpoint folder, emptied if its checkpoints came from a different setup.

    Resuming is only right for the same model, data and settings; anything else starts afresh.
    """
    import shutil

    fingerprint = content_hash([*setup, params.model_dump(mode="json"), [(e.image, e.question) for e in examples]], 64)
    checkpoints = output_dir / "checkpoints"
    marker = checkpoints / "setup.sha256"
    if checkpoints.exists() and (not marker.exists() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return checkpoints


@dataclass
class FinetuneResult:
    adapter_dir: Path | None  # None when no adapter was trained (the vision alignment)
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


def _train(model, processor, examples: Sequence[VQAExample], params: FinetuneParams, output_dir: Path,
           setup: list[Any], device: str, seed: int):
    """Run ``Trainer`` with the answer-only loss; resumes from this setup's checkpoints if any."""
    from transformers import TrainingArguments

    checkpoints = _checkpoints_for(output_dir, setup, examples, params)
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
        **_precision_flags(params, device),
    )
    trainer = _answer_loss_trainer()(
        model=model,
        args=args,
        train_dataset=VQATrainingSet(processor, examples),
        data_collator=LeftPadCollator(processor.tokenizer.pad_token_id),
        optimizers=(_optimizer(model, params), None),
    )
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if any(checkpoints.glob("checkpoint-*")) else None)
    return trainer, time.perf_counter() - started


def _save_with_processor(model, processor, directory: Path) -> Path:
    """``save_pretrained`` model and processor together, atomically: a folder exists only when whole."""
    with atomic_directory(Path(directory)) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(directory)


def _parameter_counts(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def finetune(
    source: str,
    model_dtype: str,
    device: str,
    train_examples: Sequence[VQAExample],
    params: FinetuneParams,
    output_dir: Path,
    seed: int = 0,
) -> FinetuneResult:
    """QLoRA-finetune ``source`` and save ``output_dir/adapter`` and ``output_dir/merged``."""
    output_dir = Path(output_dir)
    processor = load_processor(source)
    model = load_for_finetuning(source, model_dtype, device, params)
    trainable, total = _parameter_counts(model)
    trainer, train_seconds = _train(model, processor, train_examples, params, output_dir, [source, model_dtype, seed], device, seed)

    adapter_dir = _save_with_processor(model, processor, output_dir / "adapter")
    merged_dir = merge_adapter(source, adapter_dir, output_dir / "merged", model_dtype, qlora_quantization(params))
    atomic_write_json(output_dir / "log_history.json", trainer.state.log_history)
    return FinetuneResult(adapter_dir, merged_dir, trainer.state.log_history, trainable, total, train_seconds, trainer.state.global_step)


_MODULE_PREFIXES = {"vision_tower": VISION_TOWER, "multi_modal_projector": PROJECTOR}


def align_vision(
    source: str,
    model_dtype: str,
    device: str,
    train_examples: Sequence[VQAExample],
    params: FinetuneParams,
    output_dir: Path,
    seed: int = 0,
) -> FinetuneResult:
    """Train only ``fully_trained_modules`` (tower, projector) against the frozen language model of ``source``.

    LLaVA's stage-1 objective, run after the SFT on the embedded model: the adapter has learned the
    answers, and the vision side then learns to drive that adapted, frozen language model. In the
    usual order (alignment, then SFT) the LoRA SFT undid the alignment here (89.7 % naming after
    alignment, 41-51 % after the SFT that followed).

    The model is loaded unquantized whatever ``params.quantization`` says: ``source`` is a merged
    QLoRA model, and rounding it to nf4 again erases most of the merged adapter (measured: the
    answer loss went from 0.45 back to 3.5). No adapter is involved, so the trained model is saved
    as it is: with peft's zero-initialised LoRA layers in the way a step took 1.6-1.8 s, without 1.2 s.
    """
    alignment = params.alignment
    examples = [e for e in train_examples if e.question_kind in alignment.question_kinds]
    stage_params = params.model_copy(update={"max_steps": alignment.steps, "modules_learning_rate": alignment.learning_rate})
    output_dir = Path(output_dir)
    processor = load_processor(source)
    model = load_llava(source, dtype=model_dtype, device=device)
    trained_prefixes = tuple(_MODULE_PREFIXES[name] + "." for name in params.fully_trained_modules)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trained_prefixes))
    if params.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable, total = _parameter_counts(model)
    trainer, train_seconds = _train(model, processor, examples, stage_params, output_dir, [source, model_dtype, seed, "align"], device, seed)

    merged_dir = _save_with_processor(model, processor, output_dir / "merged")
    atomic_write_json(output_dir / "log_history.json", trainer.state.log_history)
    return FinetuneResult(None, merged_dir, trainer.state.log_history, trainable, total, train_seconds, trainer.state.global_step)


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

    base = load_llava(base_source, dtype=dtype, device="cpu", quantization_config=quantization_config)
    if quantization_config is not None:
        base = base.dequantize(dtype=TORCH_DTYPES[dtype])
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return _save_with_processor(merged, load_processor(str(adapter_dir)), merged_dir)
