"""A 4-bit weight format whose zero-points are floats, so that a finetune folds into it exactly (08_beyond).

Every decoder linear stores, per group of ``group_size`` input columns of an output row,

    W[o, j] = q[o, j] · s[o, g] + m[o, g],    g = j // group_size,  q ∈ {0 … 15},

with ``s`` (scale) and ``m`` (offset) in fp32. A change that is constant within each group (QA-LoRA's
group-pooled adapter, ``medcomp.qalora``) is ``m += c``: the merged model is the trained one, to one fp32
rounding, and still a plain 4-bit model with no adapter.

Why a format of our own (issue 31): AWQ's GEMM format, the one 05 writes, packs *integer* zero-points, where
the fold would round; torchao's CPU int4 format (0.18) is a prototype that ``save_pretrained`` refuses;
transformers 5.23 answers HQQ with "not available yet". So the packed nibbles, scales and offsets are saved
with safetensors beside the LLaVA config and processor, and ``load_int4`` rebuilds the model (tested: the
same logits after a reload). AWQ's ``(q − z)·s`` is ``m = −z·s``, exact in fp32 for fp16 scales, so 05's AWQ
and RTN checkpoints, and GPTQ's, convert losslessly (``from_quantized_checkpoint``; AWQ's unpacking is GPTQModel's own).

Serving: on the CPU through ATen's ``_weight_int4pack_mm_for_cpu`` in bf16, the kernel GPTQModel's
``torch_fused_awq`` layer serves 05's AWQ models with (tinygemm's convention is ``(q − 8)·s + zero``, so
``zero = m + 8·s``): the fold costs nothing at decode time. The zero-point kernel input is bf16, which rounds
the fold like any weight (``served_error`` measures it). Elsewhere (CUDA, also a T4's sm_75, where no torch
int4 kernel takes float zero-points) the weights are dequantized to the activation dtype per forward:
correct everywhere, slower than ExLlama's integer-zero kernel. ``exact`` mode (training, the exactness
checks) dequantizes once to fp32 and keeps that copy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

BITS = 4
FORMAT = "medcomp-int4-float-offset"
WEIGHTS = "model.safetensors"


class LowRankAdapter(nn.Module):
    """``scaling · B A x``; with ``pool > 1`` A reads each group's mean input (QA-LoRA), so ``B A`` is constant
    within every group and folds into the offsets. Names carry ``lora_`` so training's optimizer groups them."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, pool: int = 1, dropout: float = 0.0):
        super().__init__()
        if in_features % pool:
            raise ValueError(f"pool {pool} does not divide {in_features} input features")
        self.lora_A = nn.Parameter(torch.empty(r, in_features // pool))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # zero: the adapter starts as the identity change
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's LoRA initialisation
        self.register_buffer("scaling", torch.tensor(float(alpha) / r))
        self.register_buffer("pool", torch.tensor(int(pool)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        pool = int(self.pool)
        if pool > 1:
            x = x.unflatten(-1, (-1, pool)).mean(-1)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def group_constant(self) -> torch.Tensor:
        """The weight change per (output row, group): ``scaling · (B A) / pool`` (a mean is a sum / pool)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * float(self.scaling) / int(self.pool)


class _DequantizedLinear(torch.autograd.Function):
    """``x Wᵀ`` with the dequantized W rebuilt for the backward pass instead of saved: autograd would otherwise keep
    every layer's dense weight alive until the backward (on a 7B model, the fp16 model again)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Int4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dense_weight(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dense_weight(grad), None


class Int4Linear(nn.Module):
    """A 4-bit linear with float offsets (see the module docstring), optionally with an unmerged ``adapter``."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device: Any = None):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"group size {group_size} does not divide {in_features} input features")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.adapter: LowRankAdapter | None = None
        self.exact = False  # True: fp32 dequantized weights, kept (training, exactness checks)
        self._dense: torch.Tensor | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- building
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> "Int4Linear":
        """``codes`` (out, in) in 0..15, ``scales``/``offsets`` (out, groups)."""
        if codes.shape != (self.out_features, self.in_features) or int(codes.min()) < 0 or int(codes.max()) > 15:
            raise ValueError(f"codes must be ({self.out_features}, {self.in_features}) in 0..15")
        codes = codes.to(torch.uint8)
        self.qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        self.scales, self.offsets = scales.float().contiguous(), offsets.float().contiguous()
        self._forget()
        return self

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Round-to-nearest, asymmetric min-max per group (the grid GPTQModel's RTN computes)."""
        out_features, in_features = weight.shape
        groups = weight.detach().float().view(out_features, -1, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zeros = torch.round(-low / scales).clamp(0, 15)
        codes = torch.clamp(torch.round(groups / scales[..., None]) + zeros[..., None], 0, 15)
        layer = cls(in_features, out_features, group_size, bias is not None)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer.set_codes(codes.view(out_features, in_features), scales, -zeros * scales)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> "Int4Linear":
        """From AWQ GEMM tensors (05's AWQ and RTN checkpoints), unpacked by GPTQModel's own AWQ utilities."""
        from gptqmodel.quantization.awq.utils.packing_utils import reverse_awq_order, unpack_awq

        codes, zeros = reverse_awq_order(*unpack_awq(qweight, qzeros, BITS), BITS)
        codes, zeros = codes & 15, zeros & 15  # (in, out), (groups, out)
        scale = scales.float().t()
        layer = cls(codes.shape[0], codes.shape[1], group_size, bias is not None)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer.set_codes(codes.t(), scale, -zeros.float().t() * scale)

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                  g_idx: torch.Tensor | None = None, zero_offset: int = 1) -> "Int4Linear":
        """From GPTQ tensors: ``qweight`` (in/8, out) packs 8 input rows per int32, ``qzeros`` (groups, out/8) 8 output
        columns; GPTQ's v1 checkpoint format stores each zero-point minus one (``zero_offset`` 1; 0 for v2). Only the
        natural group order (``desc_act: false``) maps onto per-group offsets."""
        shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
        codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])  # (in, out)
        zeros = ((qzeros[:, :, None] >> shifts[None, None, :]) & 15).reshape(qzeros.shape[0], -1)[:, :scales.shape[1]] + zero_offset
        natural = torch.arange(codes.shape[0]) // group_size
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), natural):
            raise ValueError("GPTQ with act-order (desc_act) reorders the groups: quantize with desc_act=False")
        scale = scales.float().t()
        layer = cls(codes.shape[0], codes.shape[1], group_size, bias is not None)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer.set_codes(codes.t(), scale, -zeros.float().t() * scale)

    # ---------------------------------------------------------------- reading
    def codes(self) -> torch.Tensor:
        return torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).view(self.out_features, self.in_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        grouped = self.codes().float().view(self.out_features, -1, self.group_size)
        weight = grouped * self.scales[..., None] + self.offsets[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)

    def fold_adapter(self) -> None:
        """Merge a group-pooled adapter into the offsets (exact to one fp32 rounding) and drop it."""
        if self.adapter is None:
            return
        if int(self.adapter.pool) != self.group_size:
            raise ValueError(f"only an adapter pooled over the quantization groups ({self.group_size}) folds into the offsets; "
                             f"this one pools {int(self.adapter.pool)}: serve it unmerged")
        self.offsets = self.offsets + self.adapter.group_constant().to(self.offsets.device)
        self.adapter = None
        self._forget()

    # ---------------------------------------------------------------- computing
    def _forget(self) -> None:
        self._dense, self._packed = None, None

    def _cpu_kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().int().contiguous(), 1)
            zero = self.offsets + 8 * self.scales  # tinygemm: W = (q - 8)·s + zero
            scale_and_zero = torch.stack([self.scales.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self._packed = (packed, scale_and_zero)
        return self._packed

    def dense_weight(self, like: torch.Tensor) -> torch.Tensor:
        """The dequantized weight for ``like``'s device: on the CPU in fp32, kept in exact mode (one copy, reused by
        every step); elsewhere in ``like``'s dtype, rebuilt on each call (a 7B model's fp32 copy fits no T4)."""
        if like.device.type != "cpu":
            return self.dequantized(like.dtype)
        if not self.exact:
            return self.dequantized(torch.float32)
        if self._dense is None:
            self._dense = self.dequantized(torch.float32)
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact or x.device.type != "cpu":
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            out = _DequantizedLinear.apply(x.to(compute), self).to(x.dtype)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
        else:
            packed, scale_and_zero = self._cpu_kernel_inputs()
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scale_and_zero)
            out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                out = out + self.bias.to(x.dtype)
        if self.adapter is not None:
            out = out + self.adapter(x).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}, adapter={self.adapter is not None}"


# -------------------------------------------------------------------- whole models

def int4_linears(model) -> Iterator[tuple[str, Int4Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            yield name, module


def set_exact(model, exact: bool) -> None:
    for _, module in int4_linears(model):
        module.exact = exact
        module._forget()


def fold_adapters(model) -> int:
    """Fold every group-pooled adapter into its offsets; returns how many were folded."""
    linears = [m for _, m in int4_linears(model) if m.adapter is not None]
    for module in linears:
        module.fold_adapter()
    return len(linears)


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _skeleton(config):
    """The LLaVA of ``config`` with parameters on the meta device (no 7B allocated) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import LlavaForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        return LlavaForConditionalGeneration(config)


def _decoder_linear_names(model) -> list[str]:
    """Every linear of the language model's blocks (q/k/v/o, gate/up/down): what 05 quantizes, no more."""
    return [name for name, module in model.named_modules() if ".language_model.layers." in f".{name}" and isinstance(module, nn.Linear)]


def _with_tied_embeddings(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where input and output embeddings are tied, a checkpoint may hold either one (safetensors keeps one copy of a
    shared tensor; GPTQModel keeps the lm_head, ``save_int4`` the embeddings): give the other key the same tensor."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return state
    modules = {id(module): name for name, module in model.named_modules()}
    names = [f"{modules[id(m)]}.weight" for m in (model.get_input_embeddings(), model.get_output_embeddings()) if id(m) in modules]
    present = [name for name in names if name in state]
    return {**state, **{name: state[present[0]] for name in names if name not in state}} if present and len(names) == 2 else state


def _fill(model, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str):
    """Assign ``state`` to the skeleton (floating tensors outside the int4 linears in ``dtype``), tie, check, move."""
    state = _with_tied_embeddings(model, state)
    int4_prefixes = tuple(f"{name}." for name, _ in int4_linears(model))
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.startswith(int4_prefixes) else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"int4 checkpoint holds tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ValueError(f"int4 checkpoint lacks {left[:5]} (missing: {missing[:5]})")
    return model.to(device).eval()


def from_quantized_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """A GPTQModel checkpoint (05's AWQ/RTN in GEMM format, or GPTQ's own) as an int4 model: the same 4-bit grid,
    codes and scales, with float offsets. Lossless: AWQ's and GPTQ's ``(q − z)·s`` is ``q·s + m`` with ``m = −z·s``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    quantization = getattr(config, "quantization_config", None) or {}
    group_size, method = int(quantization["group_size"]), str(quantization.get("quant_method"))
    version = str(quantization.get("checkpoint_format", quantization.get("format", "gptq")))
    if method not in ("awq", "gptq"):
        raise ValueError(f"{path}: quant_method {method!r} is neither AWQ nor GPTQ")
    del config.quantization_config
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    model = _skeleton(config)
    for name in _decoder_linear_names(model):
        tensors = [state.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales")]
        bias = state.pop(f"{name}.bias", None)
        if method == "awq":
            linear = Int4Linear.from_awq(*tensors, group_size, bias)
        else:
            linear = Int4Linear.from_gptq(*tensors, group_size, bias, state.pop(f"{name}.g_idx", None), zero_offset=0 if version == "gptq_v2" else 1)
        _replace(model, name, linear)
        for key, value in linear.state_dict().items():
            state[f"{name}.{key}"] = value
    model.config.medcomp_int4 = {"format": FORMAT, "bits": BITS, "group_size": group_size, "from": method}
    return _fill(model, state, getattr(torch, dtype), device)


def round_to_nearest(model, group_size: int):
    """``model`` (full precision, in place) with every decoder linear rounded to nearest into int4: the grid of
    GPTQModel's RTN, computed here for models that never went through 05 (the tests' tiny ones)."""
    for name in _decoder_linear_names(model):
        linear = model.get_submodule(name)
        _replace(model, name, Int4Linear.from_weight(linear.weight, group_size, linear.bias).to(linear.weight.device))
    model.config.medcomp_int4 = {"format": FORMAT, "bits": BITS, "group_size": group_size, "from": "rtn"}
    return model


def attach_adapters(model, r: int, alpha: float, pooled: bool, dropout: float = 0.0) -> int:
    """A ``LowRankAdapter`` on every int4 linear (group-pooled when ``pooled``); returns the trainable parameter count."""
    count = 0
    for _, module in int4_linears(model):
        module.adapter = LowRankAdapter(module.in_features, module.out_features, r, alpha, module.group_size if pooled else 1, dropout)
        count += module.adapter.lora_A.numel() + module.adapter.lora_B.numel()
    return count


def save_int4(model, processor, directory: Path | str, write_id: str | None = None) -> Path:
    """Config (with the format's record), processor and one safetensors file of every tensor, atomically."""
    from safetensors.torch import save_model

    from medcomp.files import atomic_directory

    if not getattr(model.config, "medcomp_int4", None):
        raise ValueError("not an int4 model (config.medcomp_int4 missing): build it with from_quantized_checkpoint or round_to_nearest")
    adapters = [name for name, m in int4_linears(model) if m.adapter is not None]
    model.config.medcomp_int4 = {**model.config.medcomp_int4, "unmerged adapters": len(adapters)}
    with atomic_directory(Path(directory), write_id) as staging:
        model.config.save_pretrained(staging)
        processor.save_pretrained(staging)
        save_model(model, str(Path(staging) / WEIGHTS))  # drops the tied lm_head copy; load_int4 ties it back
    return Path(directory)


def is_int4_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.exists() and "medcomp_int4" in json.loads(config.read_text())


def load_int4(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Rebuild a saved int4 model (with its unmerged adapters, if it has any) onto ``device``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    if not is_int4_checkpoint(path):
        raise ValueError(f"{path} is not a medcomp int4 checkpoint (its config.json has no medcomp_int4 record)")
    config = AutoConfig.from_pretrained(path)
    group_size = int(config.medcomp_int4["group_size"])
    state = load_file(str(Path(path) / WEIGHTS))
    model = _skeleton(config)
    for name in _decoder_linear_names(model):
        scales = state[f"{name}.scales"]
        linear = Int4Linear(scales.shape[1] * group_size, scales.shape[0], group_size, f"{name}.bias" in state)
        if f"{name}.adapter.lora_A" in state:
            a, b = state[f"{name}.adapter.lora_A"], state[f"{name}.adapter.lora_B"]
            pool = int(state[f"{name}.adapter.pool"])
            linear.adapter = LowRankAdapter(linear.in_features, linear.out_features, a.shape[0], 1.0, pool)
        _replace(model, name, linear)
    return _fill(model, state, getattr(torch, dtype), device)
