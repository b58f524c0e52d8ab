"""Rank a LLaVA's decoder blocks by how much removing each one matters (paper section 3.2).

``similarity_sweep`` is the paper's criterion (Eq. 2-5): remove one block, answer a calibration set,
embed the pruned and unpruned answers with all-MiniLM-L6-v2, average the cosine similarities. A
high similarity marks an unimportant block. Three baselines rank the same blocks on the same
calibration set:

- ``magnitude_scores``: sum of |W| of the block (the paper's Table 5 baseline);
- ``block_influence``: ShortGPT's 1 - cos(block input, block output), over answer tokens;
- ``perplexity_sweep``: perplexity of the reference answers with the block removed (Shortened
  LLaMA's PPL criterion).

Every ranking lists layers least important first: the order in which ``03_prune`` removes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from medcomp.costs import forward_flops, model_dtype, operation
from medcomp.data import VQAExample
from medcomp.evaluation import generate_answers
from medcomp.encoding import IGNORE_INDEX, answer_loss, teacher_forced_batches
from medcomp.files import atomic_write_json, atomic_write_text, content_hash
from medcomp.loading import decoder_layers, to_model
from medcomp.pruning import without_layer_given_input, without_layers

# From the authors' public code: their finetuned LLaVA-1.5-7B's blocks, least important first
# (0-based decoder indices). Meaningful only for a 32-layer LLaVA-1.5-7B.
AUTHORS_PUBLISHED_ORDER = (23, 4, 18, 22, 21, 24, 17, 27, 20, 26, 19, 29, 28, 5)
AUTHORS_MODEL_LAYERS = 32


def sample_calibration(train_examples: Sequence[VQAExample], size: int, seed: int) -> list[VQAExample]:
    """A seeded random sample of the *training* conversations (never the test set)."""
    import random

    if size > len(train_examples):
        raise ValueError(f"calibration size {size} exceeds the {len(train_examples)} training examples")
    return random.Random(seed).sample(list(train_examples), size)


def embed(sentence_model, texts: Sequence[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(sentence_model.encode(list(texts), convert_to_numpy=True, batch_size=64)), dim=-1)


class LayerCache:
    """One JSON file of per-layer results, rewritten atomically after every layer, so an interrupted
    sweep resumes where it stopped. Results of another setup (model, calibration, settings) are discarded."""

    def __init__(self, path: Path, setup: Any):
        self.path = Path(path)
        self.setup = content_hash(setup, 32)
        stored = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.entries: dict[str, Any] = stored.get("entries", {}) if stored.get("setup") == self.setup else {}

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        atomic_write_json(self.path, {"setup": self.setup, "entries": self.entries})


def similarity_sweep(
    model,
    processor,
    calibration: Sequence[VQAExample],
    sentence_model,
    layers: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    cache_path: Path,
    setup: Any = None,
    reference: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The paper's criterion for every layer in ``layers``, one row per layer: mean similarity
    (Eq. 5), its spread, the per-item similarities, seconds spent generating and embedding, and the
    pruned answers. ``reference`` (the unpruned answers) is generated if not given. Finished layers
    are read back from ``cache_path``; results of another setup there are discarded.
    """
    if reference is None:
        reference = answer_texts(model, processor, calibration, max_new_tokens, batch_size)
    cache = LayerCache(cache_path, [setup, [(e.image, e.question) for e in calibration], max_new_tokens, batch_size, list(reference)])
    reference_embeddings = embed(sentence_model, reference)
    rows = []
    with operation("prune-one-block sweep (similarity)", "ranking", model_dtype(model)):
        rows = _similarity_rows(model, processor, calibration, layers, max_new_tokens, batch_size, sentence_model, cache, reference_embeddings)
    return pd.DataFrame(rows).set_index("layer")


def _similarity_rows(model, processor, calibration, layers, max_new_tokens, batch_size, sentence_model, cache, reference_embeddings) -> list[dict[str, Any]]:
    rows = []
    for layer in tqdm(layers, desc="prune-one-block sweep", unit="layer"):
        entry = cache.get(f"layer {layer}")
        if entry is None:
            started = time.perf_counter()
            with without_layers(model, [layer]):
                answers = [row["answer"] for row in generate_answers(model, processor, calibration, max_new_tokens, batch_size, progress=False)]
            generated = time.perf_counter()
            similarities = (embed(sentence_model, answers) * reference_embeddings).sum(dim=-1)
            entry = {"similarities": similarities.tolist(), "answers": answers,
                     "generate_seconds": generated - started, "embed_seconds": time.perf_counter() - generated}
            cache.put(f"layer {layer}", entry)
        sims = np.asarray(entry["similarities"])
        rows.append({"layer": layer, "similarity": float(sims.mean()), "similarity_std": float(sims.std()),
                     "similarities": entry["similarities"], "generate_seconds": entry["generate_seconds"],
                     "embed_seconds": entry["embed_seconds"], "answers": entry["answers"]})
    return rows


def answer_texts(model, processor, examples: Sequence[VQAExample], max_new_tokens: int, batch_size: int) -> list[str]:
    return [row["answer"] for row in generate_answers(model, processor, examples, max_new_tokens, batch_size, progress=False)]


def workflow_cases(sweep: pd.DataFrame, reference: Sequence[str], item: int = 0) -> list[dict[str, Any]]:
    """Figure 2's two cases from a sweep: the least and the most important block, on one calibration item."""
    least, most = sweep["similarity"].idxmax(), sweep["similarity"].idxmin()
    return [{"layer": int(layer), "item": item, "unpruned": reference[item], "pruned": sweep.loc[layer, "answers"][item],
             "similarity": float(sweep.loc[layer, "similarities"][item]), "mean_similarity": float(sweep.loc[layer, "similarity"])}
            for layer in (least, most)]


def magnitude_scores(model, layers: Sequence[int]) -> pd.Series:
    """Sum of |W| over every parameter of each block (low = removed first)."""
    blocks = decoder_layers(model)
    with torch.no_grad():
        # fp32 accumulation: a 7B block's |W| sums to millions, past fp16's 65,504 (inf would make the ranking index order)
        return pd.Series({i: float(sum(p.detach().abs().sum(dtype=torch.float32) for p in blocks[i].parameters())) for i in layers}, name="magnitude")


@torch.no_grad()
def block_influence(model, processor, calibration: Sequence[VQAExample], layers: Sequence[int], batch_size: int = 16,
                    batches: Sequence[dict[str, torch.Tensor]] | None = None) -> pd.Series:
    """ShortGPT's Block Influence: 1 - cos(input, output) of each block, averaged over answer tokens.

    One teacher-forced forward per batch (image, question, reference answer), hooks on every block.
    """
    blocks = decoder_layers(model)
    totals = {i: 0.0 for i in layers}
    count = 0
    for batch in batches if batches is not None else teacher_forced_batches(processor, calibration, batch_size):
        batch = to_model(batch, model)
        labels, _ = batch.pop("labels"), batch.pop("answer_span")
        # A label at position t+1 marks position t's hidden state as one that predicts an answer token.
        answer_positions = torch.zeros_like(labels, dtype=torch.bool)
        answer_positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        captured: dict[int, float] = {}

        def hook(index):
            def record(module, args, kwargs, output):
                hidden_in = args[0] if args else kwargs["hidden_states"]
                hidden_out = output[0] if isinstance(output, tuple) else output
                cosine = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
                captured[index] = float((1 - cosine)[answer_positions].sum())
            return record

        handles = [blocks[i].register_forward_hook(hook(i), with_kwargs=True) for i in layers]
        try:
            model(**batch, logits_to_keep=1, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for i in layers:
            totals[i] += captured[i]
        count += int(answer_positions.sum())
    return pd.Series({i: totals[i] / count for i in layers}, name="block_influence")


@torch.no_grad()
def reference_perplexity(model, processor, calibration: Sequence[VQAExample], batch_size: int = 16,
                         batches: Sequence[dict[str, torch.Tensor]] | None = None) -> float:
    """exp of the mean cross-entropy over the reference answers' tokens (``batches``: pre-encoded)."""
    total, tokens = 0.0, 0
    for batch in batches if batches is not None else teacher_forced_batches(processor, calibration, batch_size):
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(answer_loss(model, to_model(batch, model))) * n
        tokens += n
    return float(np.exp(total / tokens))


def layer_inputs(model, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each block's input hidden states on ``batch`` (teacher-forced) in the unpruned model, kept on
    the CPU: 29 blocks of a 7B model's calibration batch would not fit beside it on a T4."""
    blocks = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(module, args, kwargs):
            seen[index] = (args[0] if args else kwargs["hidden_states"]).detach().to("cpu")
        return record

    handles = [blocks[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model(**{k: v for k, v in batch.items() if k not in ("labels", "answer_span")}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def perplexity_sweep(model, processor, calibration: Sequence[VQAExample], layers: Sequence[int], batch_size: int = 16,
                     batches: Sequence[dict[str, torch.Tensor]] | None = None, progress: bool = True) -> pd.Series:
    """Reference-answer perplexity with each block removed in turn (low = removed first).

    Per batch, one unpruned forward records every block's input; removing block ``i`` then runs only
    the blocks after it (``pruning.without_layer_given_input``): half the work of running the pruned
    model whole, and the same perplexities to the bit (tested against ``without_layers``).
    """
    if batches is None:
        batches = teacher_forced_batches(processor, calibration, batch_size)  # tokenised once, not once per layer
    totals, tokens = {layer: 0.0 for layer in layers}, 0
    bar = tqdm(total=len(batches) * len(layers), desc="perplexity sweep", unit="layer", disable=not progress)
    depth = len(decoder_layers(model))
    with operation("perplexity sweep", "ranking", model_dtype(model)) as work:
        work.flops, work.tokens = 0.0, 0
        for batch in batches:
            batch = to_model(batch, model)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            inputs = layer_inputs(model, batch, layers)
            positions = int(batch["attention_mask"].sum())
            width = batch["attention_mask"].shape[1]
            # one unpruned forward, then per removed block the blocks after it
            run = 1 + sum(depth - 1 - layer for layer in layers) / depth
            work.flops += run * forward_flops(model.config, positions, context=width / 2)
            work.tokens += positions
            for layer in layers:
                with without_layer_given_input(model, layer, inputs.pop(layer).to(batch["input_ids"].device)):
                    totals[layer] += float(answer_loss(model, batch)) * n
                bar.update()
            tokens += n
    bar.close()
    return pd.Series({layer: float(np.exp(totals[layer] / tokens)) for layer in layers}, name="perplexity")


def ranking(scores: pd.Series, higher_is_less_important: bool) -> list[int]:
    """Layers least important first; ties broken by layer index, so a ranking is deterministic."""
    sign = -1 if higher_is_less_important else 1
    return sorted((int(layer) for layer in scores.index), key=lambda layer: (sign * float(scores[layer]), layer))


def rankings_table(scores: dict[str, pd.Series], orders: dict[str, list[int]]) -> pd.DataFrame:
    """Per layer: each criterion's score and its rank (1 = removed first)."""
    table = pd.DataFrame(scores)
    for name, order in orders.items():
        position = {layer: rank for rank, layer in enumerate(order, start=1)}
        table[f"{name} rank"] = [position.get(layer) for layer in table.index]
    table.index.name = "layer"
    return table


def rank_correlations(orders: dict[str, list[int]], layers: Sequence[int]) -> pd.DataFrame:
    """Spearman correlation between every pair of rankings, over the layers all of them rank."""
    from scipy.stats import spearmanr

    names = list(orders)
    common = [layer for layer in layers if all(layer in orders[name] for name in names)]
    ranks = {name: [orders[name].index(layer) for layer in common] for name in names}
    matrix = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            matrix.loc[a, b] = 1.0 if a == b else float(spearmanr(ranks[a], ranks[b]).statistic)
    return matrix


def save_rankings(directory: Path, orders: dict[str, list[int]], table: pd.DataFrame, meta: dict[str, Any]) -> Path:
    """``rankings.json`` (least important first, per criterion) and ``rankings.csv`` (scores, ranks)."""
    directory = Path(directory)
    atomic_write_json(directory / "rankings.json", {"orders": orders, **meta})
    atomic_write_text(directory / "rankings.csv", table.to_csv())
    return directory / "rankings.json"


def load_rankings(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "rankings.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run 02_layer_importance first")
    return json.loads(path.read_text())


def iterative_removal(model, processor, calibration: Sequence[VQAExample], candidates: Sequence[int], count: int, batch_size: int = 16,
                      progress: bool = True) -> tuple[list[int], list[pd.Series]]:
    """SLEB (Song et al., 2024): remove the block whose removal raises the reference answers' perplexity least,
    then score the remaining ``candidates`` again *on the pruned model*, ``count`` times: a block's importance
    changes once its neighbours are gone, which the one-shot ranking cannot see. Each round is 02's replayed
    perplexity sweep (``perplexity_sweep``) on the model pruned so far. Returns the blocks removed, as indices of the
    unpruned model in removal order, and each round's scores (indexed the same way)."""
    batches = teacher_forced_batches(processor, calibration, batch_size)
    num_layers = len(decoder_layers(model))
    removed: list[int] = []
    rounds: list[pd.Series] = []
    with operation(f"iterative removal (SLEB, {count} rounds)", "ranking", model_dtype(model)):
        for _ in tqdm(range(count), desc="iterative removal", unit="block", disable=not progress):
            kept = [index for index in range(num_layers) if index not in removed]
            remaining = [index for index in candidates if index not in removed]
            with without_layers(model, removed):
                scores = perplexity_sweep(model, processor, calibration, [kept.index(index) for index in remaining], batches=batches, progress=False)
            scores.index = remaining
            removed.append(ranking(scores, higher_is_less_important=False)[0])
            rounds.append(scores)
    return removed, rounds
