"""02_layer_importance: every ranking criterion on one calibration set, and the sweep's cost up front."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from medcomp import importance
from medcomp.data import VQAExample
from medcomp.paper import TABLE_4
from medcomp.pruning import prunable_layers

# The paper's measured decode latency of LLaVA-1.5-7B on a T4 (Table 4, "Original LLaVA").
PAPER_T4_SECONDS_PER_TOKEN = float(TABLE_4.loc["Original LLaVA", "latency (ms/token)"]) / 1000
PAPER_MODEL_LAYERS = 32


def sweep_cost(per_pass_seconds: float, removable: int, calibration_size: int, batch_size: int, max_new_tokens: int,
               protect_first: int, protect_last: int) -> pd.DataFrame:
    """What the similarity sweep will cost: one pass over the calibration set (measured) times the
    removable layers here, and for LLaVA-1.5-7B on a T4 (its removable layers under the same
    protection, every batch decoding ``max_new_tokens`` at the paper's measured ms/token)."""
    batches = -(-calibration_size // batch_size)
    paper_removable = len(prunable_layers(PAPER_MODEL_LAYERS, protect_first, protect_last))
    t4_estimate = paper_removable * batches * max_new_tokens * PAPER_T4_SECONDS_PER_TOKEN
    return pd.DataFrame({"seconds": [per_pass_seconds, per_pass_seconds * removable, t4_estimate]},
                        index=["one pass over the calibration set (this machine)", f"estimated sweep over {removable} layers (this machine)",
                               f"estimated sweep for LLaVA-1.5-7B on a T4 ({paper_removable} layers, paper's "
                               f"{PAPER_T4_SECONDS_PER_TOKEN * 1000:.0f} ms/token)"]).round(1)


@dataclass
class Rankings:
    scores: dict[str, pd.Series]  # criterion -> score per layer
    orders: dict[str, list[int]]  # criterion -> layers, least important first
    seconds: dict[str, float]  # criterion -> seconds it took
    reference_perplexity: float  # of the unpruned model on the reference answers


def rank_by_every_criterion(model, processor, calibration: Sequence[VQAExample], removable: Sequence[int], similarity: pd.Series,
                            similarity_seconds: float, batch_size: int, num_layers: int) -> Rankings:
    """The paper's similarity ranking (already swept) beside magnitude, block influence and
    perplexity on the same calibration set; the authors' published order too on a 32-layer model."""
    scores, seconds = {"similarity": similarity}, {}
    started = time.perf_counter()
    scores["magnitude"] = importance.magnitude_scores(model, removable)
    seconds["magnitude"] = time.perf_counter() - started
    batches = importance.teacher_forced_batches(processor, calibration, batch_size)  # image, question, reference answer
    started = time.perf_counter()
    scores["block_influence"] = importance.block_influence(model, processor, calibration, removable, batches=batches)
    seconds["block_influence"] = time.perf_counter() - started
    started = time.perf_counter()
    baseline_ppl = importance.reference_perplexity(model, processor, calibration, batches=batches)
    scores["perplexity"] = importance.perplexity_sweep(model, processor, calibration, removable, batches=batches)
    seconds["perplexity"] = time.perf_counter() - started
    seconds["similarity"] = similarity_seconds
    orders = {"similarity": importance.ranking(scores["similarity"], higher_is_less_important=True),
              "magnitude": importance.ranking(scores["magnitude"], higher_is_less_important=False),
              "block_influence": importance.ranking(scores["block_influence"], higher_is_less_important=False),
              "perplexity": importance.ranking(scores["perplexity"], higher_is_less_important=False)}
    if num_layers == importance.AUTHORS_MODEL_LAYERS:
        orders["authors"] = list(importance.AUTHORS_PUBLISHED_ORDER)
    return Rankings(scores, orders, seconds, baseline_ppl)
