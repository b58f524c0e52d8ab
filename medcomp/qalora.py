"""Adapters trained against the 4-bit grid a model is served on, merged into it exactly or kept unmerged (08_beyond).

- **QA-LoRA** (Xu et al., ICLR 2024; github.com/yuhuixu1993/qa-lora): the adapter's A reads the mean of each
  quantization group's inputs (the reference pools with ``AvgPool1d`` over the group, as here), so ``B A`` is
  constant within every group of 64 weights. It trains against the dequantized 4-bit weights, then folds
  into the float offsets of ``medcomp.int4``: the served model is a plain 4-bit model, the trained one to one
  fp32 rounding, with no adapter. ``fold_exactness`` measures that, and what the bf16 kernel adds.
- **LoRA against the grid** (``pooled=False``): the same loop with an ordinary adapter, served unmerged. It is
  the fast form of 05's old quantize-then-recover (peft's ``AwqLoraLinear`` dequantizes GPTQModel's packed
  weights on every forward: 65-70 s a step here); the int4 linear's exact mode computes the same function
  from one fp32 copy of the weights.

Why not peft: peft's LoRA has no pooled form, and its layers do not wrap ``Int4Linear``. The adapter is 30
lines (``int4.LowRankAdapter``) and is tested against an independent dense computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from medcomp.data import VQAExample
from medcomp.distillation import Distillation
from medcomp.encoding import LeftPadCollator, VQATrainingSet
from medcomp.int4 import attach_adapters, fold_adapters, from_quantized_checkpoint, is_int4_checkpoint, load_int4, set_exact
from medcomp.loading import checkpoint_identity, load_processor, to_model
from medcomp.params import FinetuneParams
from medcomp.training import train_prepared


@dataclass
class GridTraining:
    model: Any  # the int4 model with its trained adapters, exact mode, eval
    log_history: list[dict[str, Any]]
    trainable_parameters: int
    train_seconds: float
    steps: int


def load_grid(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A 4-bit grid to train on: a saved int4 model, or 05's AWQ/RTN GEMM checkpoint converted losslessly."""
    return load_int4(path, dtype, device) if is_int4_checkpoint(path) else from_quantized_checkpoint(path, dtype, device)


def train_on_grid(grid: str | Path, processor_source: str, device: str, train_examples: Sequence[VQAExample], params: FinetuneParams,
                  output_dir: Path, seed: int = 0, pooled: bool = True, distillation: Distillation | None = None) -> GridTraining:
    """Adapters (``params.lora``: r, alpha, dropout) on every decoder linear of the 4-bit ``grid``, trained with
    training's loop and recipe (``params``) against the exact dequantized weights; everything else frozen. With
    ``distillation``, on a teacher's outputs (``medcomp.distillation``): prune, then distil into the 4-bit grid."""
    from transformers import set_seed

    set_seed(seed)  # before the adapters draw their initialisation
    model = load_grid(grid, params.compute_dtype, device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    set_exact(model, True)
    trainable = attach_adapters(model, params.lora.r, params.lora.alpha, pooled, params.lora.dropout)
    model.to(device)
    setup = [checkpoint_identity(grid), "int4 grid", "pooled" if pooled else "unpooled", seed]
    log_history, seconds, steps = train_prepared(model, load_processor(processor_source), train_examples, params, output_dir, setup, device, seed,
                                                 distillation)
    return GridTraining(model.eval(), log_history, trainable, seconds, steps)


@torch.no_grad()
def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the real tokens only: a left-pad position attends to nothing, and its garbage is not served."""
    inputs = {k: v for k, v in to_model(batch, model).items() if k != "labels"}
    return model(**inputs).logits.float()[inputs["attention_mask"].bool()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fold_exactness(model, processor, examples: Sequence[VQAExample]) -> dict[str, float]:
    """Fold ``model``'s pooled adapters (in place) and measure, on ``examples``' full sequences:
    ``fold error``, the folded model's logits against the trained model's (both exact fp32): the merge;
    ``served error``, the folded model through the bf16 int4 kernel against the same: what serving adds."""
    batch = LeftPadCollator(processor.tokenizer.pad_token_id)([VQATrainingSet(processor, examples)[i] for i in range(len(examples))])
    set_exact(model, True)
    trained = _logits(model.eval(), batch)
    folded = fold_adapters(model)
    merged = _logits(model, batch)
    set_exact(model, False)
    served = _logits(model, batch)
    return {"adapters folded": folded, "fold error": _relative(merged, trained), "served error": _relative(served, trained),
            "fold max abs": float((merged - trained).abs().max())}
