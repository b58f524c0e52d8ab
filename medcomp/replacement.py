"""Block replacement (LLM-Streamline, Chen et al. 2024): one trained block in place of a contiguous run of blocks.

Why written here rather than taken from the authors' code (RUCKBReasoning/LLM-Streamline): theirs trains Llama
and OPT text models from their own scripts; it knows neither LLaVA's image tokens nor this package's registry and
recipes. The method is three short steps:

1. ``choose_span``: the contiguous run of ``length`` removable blocks whose input and output hidden states are the
   most alike (cosine, over every attended token of a calibration set): the run that changes the representation least.
2. ``train_replacement``: one decoder block, initialised from whichever block of the run alone maps the run's input
   closest to its output, then trained (MSE) to map the teacher's hidden states entering the run to those leaving it.
   The rest of the model is neither trained nor run again: the run's inputs and outputs, with the rotary embeddings
   and attention mask the model passed to its first block, are recorded once and replayed. The error is relative per
   token (``token_errors``).
3. ``replace_and_save``: the parent without the run, the trained block in its place: an ordinary LLaVA checkpoint
   with ``length - 1`` fewer blocks, which transformers loads as it is.

Every attended token counts in the loss, not only the answer's: later blocks attend to all of them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from medcomp.costs import operation
from medcomp.files import atomic_write_bytes, atomic_write_json, content_hash
from medcomp.importance import layer_inputs
from medcomp.loading import checkpoint_identity, decoder_layers, load_llava, load_processor, save_with_processor, to_model
from medcomp.pruning import drop_layers


class _Stop(Exception):
    """Ends a recording forward once the run's output is seen: the blocks after it are not needed."""


@dataclass
class ReplayedRun:
    """What the teacher's blocks ``start`` to ``stop - 1`` saw and produced, per batch (on the CPU)."""
    start: int
    stop: int
    inputs: list[torch.Tensor] = field(default_factory=list)  # hidden states entering block start
    outputs: list[torch.Tensor] = field(default_factory=list)  # hidden states leaving block stop - 1
    call_kwargs: list[dict[str, Any]] = field(default_factory=list)  # rotary embeddings, mask, positions: as passed
    masks: list[torch.Tensor] = field(default_factory=list)  # attended tokens


def _to(value: Any, device, dtype=None) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    return value


@torch.no_grad()
def record_run(model, batches: Sequence[dict[str, torch.Tensor]], start: int, stop: int) -> ReplayedRun:
    """One forward per batch, stopped after block ``stop - 1``: the run's inputs, outputs and block-call arguments."""
    blocks = decoder_layers(model)
    record = ReplayedRun(start, stop)

    def before(module, args, kwargs):
        record.inputs.append((args[0] if args else kwargs["hidden_states"]).detach().to("cpu"))
        record.call_kwargs.append({k: _to(v, "cpu") for k, v in kwargs.items()
                                   if k in ("attention_mask", "position_ids", "position_embeddings", "cache_position")})

    def after(module, args, kwargs, output):
        record.outputs.append((output[0] if isinstance(output, tuple) else output).detach().to("cpu"))
        raise _Stop

    handles = [blocks[start].register_forward_pre_hook(before, with_kwargs=True), blocks[stop - 1].register_forward_hook(after, with_kwargs=True)]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        for batch in batches:
            batch = to_model(batch, model)
            try:
                base.model(**{k: v for k, v in batch.items() if k not in ("labels", "answer_span")}, use_cache=False)
            except _Stop:
                pass
            record.masks.append(batch["attention_mask"].to("cpu").bool())
    finally:
        for handle in handles:
            handle.remove()
    return record


@torch.no_grad()
def span_similarities(model, batches: Sequence[dict[str, torch.Tensor]], length: int, candidates: Sequence[int]) -> dict[int, float]:
    """For each start ``i`` whose run ``i .. i + length - 1`` lies within ``candidates`` (and is followed by a block): the
    mean cosine between the hidden states entering block ``i`` and entering block ``i + length``, over attended tokens.
    The inputs are recorded on the CPU by 02's ``importance.layer_inputs``: a 7B model's would not fit beside it on a T4."""
    blocks = decoder_layers(model)
    allowed = set(candidates)
    starts = [i for i in sorted(allowed) if all(j in allowed for j in range(i, i + length)) and i + length < len(blocks)]
    if not starts:
        raise ValueError(f"no run of {length} contiguous blocks among the removable ones {sorted(allowed)}")
    totals = {i: 0.0 for i in starts}
    count = 0
    for batch in batches:
        batch = to_model(batch, model)
        inputs = layer_inputs(model, batch, sorted({*starts, *(i + length for i in starts)}))
        mask = batch["attention_mask"].bool().cpu()
        for i in starts:
            cosine = torch.nn.functional.cosine_similarity(inputs[i].float(), inputs[i + length].float(), dim=-1)
            totals[i] += float(cosine[mask].sum())
        count += int(mask.sum())
    return {i: totals[i] / count for i in starts}


def choose_span(similarities: dict[int, float]) -> int:
    """The start of the most similar run; a tie goes to the earliest."""
    return max(sorted(similarities), key=lambda i: similarities[i])


def token_errors(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|predicted - target|² / |target|² per attended token. Per token, not pooled: a few tokens carry hidden states
    hundreds of times larger than the rest (massive activations), and a pooled MSE would fit those alone."""
    return (((predicted - target) ** 2).sum(-1) / (target**2).sum(-1).clamp_min(1e-12))[mask]


def relative_error(block, run: ReplayedRun, device) -> float:
    """The mean of ``token_errors`` over every attended token of the recorded run."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(len(run.inputs)):
            errors = token_errors(*_forward(block, run, b, device))
            total, count = total + float(errors.sum()), count + errors.numel()
    return total / count


def _forward(block, run: ReplayedRun, index: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = next(block.parameters()).dtype
    kwargs = {k: _to(v, device, dtype) for k, v in run.call_kwargs[index].items()}
    output = block(run.inputs[index].to(device, dtype), **kwargs)
    output = output[0] if isinstance(output, tuple) else output
    return output.float(), run.outputs[index].to(device).float(), run.masks[index].to(device)


@dataclass
class TrainedReplacement:
    block: torch.nn.Module
    initialised_from: int  # index (in the unpruned model) of the block it started as
    error_before: float  # relative MSE of the initial block on the recorded run
    error_after: float
    steps: int
    seconds: float
    losses: list[float]


def detached_copy(block: torch.nn.Module, device, dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """A copy of ``block`` on ``device`` (in ``dtype``; None keeps it), without the device hooks accelerate puts on a
    model split over GPUs."""
    from accelerate.hooks import remove_hook_from_module

    return remove_hook_from_module(copy.deepcopy(block), recurse=True).to(device=device, dtype=dtype)


def train_replacement(blocks: Sequence[torch.nn.Module] | Mapping[int, torch.nn.Module], run: ReplayedRun, steps: int, learning_rate: float,
                      device: str = "cpu", seed: int = 0, progress: bool = True) -> TrainedReplacement:
    """Initialise from the block of ``blocks[run.start:run.stop]`` with the least relative error alone, then train all its
    weights (fp32, Adam) for ``steps`` batches of the recorded run, cycling through them, to minimise the per-token
    relative error (``token_errors``).
    ``blocks``: the model's blocks, or only the run's by index (so the model itself can be freed first)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    errors = {i: relative_error(detached_copy(blocks[i], device), run, device) for i in range(run.start, run.stop)}
    first = min(errors, key=errors.get)
    block = detached_copy(blocks[first], device).train()
    for parameter in block.parameters():
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(block.parameters(), lr=learning_rate)
    losses = []
    with operation(f"block replacement training ({steps} steps)", "training") as work:
        work.notes = "one block's full weights, on recorded hidden states: work not counted"
        for step in tqdm(range(steps), desc="block replacement", unit="step", disable=not progress):
            predicted, target, mask = _forward(block, run, step % len(run.inputs), device)
            loss = token_errors(predicted, target, mask).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    block.eval()
    return TrainedReplacement(block, first, errors[first], relative_error(block, run, device), steps, time.perf_counter() - started, losses)


def save_block(block: torch.nn.Module, path: Path) -> str:
    """The trained block's weights (a safetensors file, written atomically); returns their content hash."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}))
    return block_identity(path)


def block_identity(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


def replace_and_save(source: str, start: int, stop: int, block_state: Path, target: Path, dtype: str = "float32") -> Path:
    """``source`` without blocks ``start + 1 .. stop - 1``, block ``start`` holding the trained weights in ``block_state``;
    saved (atomic) as an ordinary LLaVA checkpoint. Deterministic: the same inputs give the same checkpoint, so a rebuild
    from this recipe (``stages.materialise``) invalidates nothing computed from the first build."""
    model = load_llava(source, dtype=dtype)
    drop_layers(model, range(start + 1, stop))
    from safetensors.torch import load_file

    block = decoder_layers(model)[start]
    block.load_state_dict({k: v.to(next(block.parameters()).dtype) for k, v in load_file(str(block_state)).items()})
    save_with_processor(model, load_processor(source), target,
                        content_hash(["replace", checkpoint_identity(source), start, stop, block_identity(block_state), dtype], 32))
    atomic_write_json(Path(target) / "pruning.json", {"source": str(source), "source_identity": checkpoint_identity(source),
                                                       "layers_removed": list(range(start + 1, stop)), "replaced": [start, stop]})
    return Path(target)
