"""Answer the held-out VQA questions with a model variant, and score what can be scored exactly.

The LLM judge (07_judge) scores answer quality; here we only need what a string match can decide:
which of the diseases an answer names, and so the held-out disease-naming accuracy.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from medcomp.costs import forward_flops, model_dtype, operation
from medcomp.data import VQAExample, load_rgb
from medcomp.knowledge import DISEASES_BY_SLUG
from medcomp.loading import to_model


@torch.inference_mode()
def generate_answers(
    model,
    processor,
    examples: Sequence[VQAExample],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    description: str = "answering",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers, batched with left padding; one row per example (image, question, reference,
    answer, ``new_tokens``, and ``stopped``: whether the model emitted its end-of-turn token)."""
    processor.tokenizer.padding_side = "left"
    end_ids = model.generation_config.eos_token_id
    end_ids = set(end_ids if isinstance(end_ids, list) else [end_ids]) - {None}
    # Batches of one question kind: a batch decodes until its longest answer ends, so mixing short
    # naming answers with long follow-ups makes every row pay for the longest. Rows come back in
    # the order of ``examples``.
    order = sorted(range(len(examples)), key=lambda i: (examples[i].question_kind, i))
    rows_by_index: dict[int, dict[str, Any]] = {}
    with operation(description, "answer pass", model_dtype(model)) as work:
        work.flops, work.tokens = 0.0, 0
        for start in tqdm(range(0, len(examples), batch_size), desc=description, unit="batch", disable=not progress):
            indices = order[start : start + batch_size]
            rows_by_index.update(_answer_batch(model, processor, [examples[i] for i in indices], indices, max_new_tokens, end_ids, work))
    return [rows_by_index[i] for i in range(len(examples))]


def _answer_batch(model, processor, batch: Sequence[VQAExample], indices: Sequence[int], max_new_tokens: int, end_ids: set[int],
                  work) -> dict[int, dict[str, Any]]:
    """One batch of ``generate_answers``; adds its tokens and FLOPs to ``work`` (the cost table's)."""
    texts = [processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True) for e in batch]
    inputs = to_model(processor(text=texts, images=[load_rgb(e.image) for e in batch], return_tensors="pt", padding=True), model)
    new_tokens = greedy_tokens(model, inputs, max_new_tokens, end_ids)
    prompt = int(inputs["attention_mask"].sum())
    generated = sum(len(tokens) for tokens in new_tokens)
    # prefill: every prompt position, the head on the last one; decode: one position a token, attending to the prompt and half the answer
    work.flops += forward_flops(model.config, prompt, context=prompt / len(batch) / 2, logits=len(batch))
    work.flops += forward_flops(model.config, generated, context=prompt / len(batch) + generated / len(batch) / 2)
    work.tokens += prompt + generated
    rows_by_index = {}
    for index, example, tokens, text in zip(indices, batch, new_tokens, processor.batch_decode(new_tokens, skip_special_tokens=True)):
        rows_by_index[index] = {
            "image": example.image,
            "disease": example.disease,
            "question_kind": example.question_kind,
            "question": example.question,
            "reference": example.reference,
            "answer": text.strip(),
            "new_tokens": sum(t != processor.tokenizer.pad_token_id for t in tokens),
            "stopped": any(int(t) in end_ids for t in tokens),
        }
    return rows_by_index


@torch.inference_mode()
def greedy_tokens(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, end_ids: set[int]) -> list[list[int]]:
    """Greedy decoding of a left-padded batch that drops each row from the batch once it has ended.

    ``model.generate`` decodes every row until the batch's longest answer ends: with the rambling
    answers of pruned and quantized models (measured on the embedded run: 27-58 % of the decoded
    positions of a pruned model belong to rows that had already ended) most of the work is thrown
    away. This loop is ``generate``'s greedy search (positions from the attention mask, as
    ``generate`` computes them; the model's own KV cache), except that the cache, mask and
    positions keep only unfinished rows (``Cache.reorder_cache``, what beam search uses). Returns
    each row's tokens, its end token included. Tested against ``generate`` token for token.
    """
    from transformers import DynamicCache

    mask = inputs["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache()
    logits = model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=logits.device)
    rows = torch.arange(mask.shape[0], device=logits.device)
    tokens: list[list[int]] = [[] for _ in range(mask.shape[0])]
    next_positions = positions[:, -1:]
    for step in range(max_new_tokens):
        chosen = logits.float().argmax(-1)
        for row, token in zip(rows.tolist(), chosen.tolist()):
            tokens[row].append(token)
        unfinished = ~torch.isin(chosen, ends)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        if not bool(unfinished.all()):
            keep = unfinished.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            rows, mask, chosen, next_positions = rows[keep], mask[keep], chosen[keep], next_positions[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        next_positions = next_positions + 1
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return tokens


def _alias_pattern(alias: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(alias)}\b", re.IGNORECASE)


_ALIASES = [(slug, _alias_pattern(alias)) for slug, disease in DISEASES_BY_SLUG.items() for alias in disease.aliases]


def named_disease(answer: str) -> str | None:
    """The disease an answer names first (by its name or an accepted alias), or None."""
    hits = [(match.start(), slug) for slug, pattern in _ALIASES for match in [pattern.search(answer)] if match]
    return min(hits)[1] if hits else None


def mask_disease_names(text: str) -> str:
    """``text`` with every disease name and alias replaced by "this condition"."""
    for _, pattern in sorted(_ALIASES, key=lambda alias: -len(alias[1].pattern)):  # "atopic dermatitis" before "dermatitis"
        text = pattern.sub("this condition", text)
    return text


def naming_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The answers to 'What is the name of this disease?' with the disease each one names."""
    frame = pd.DataFrame([row for row in rows if row["question_kind"] == "name"])
    if frame.empty:
        return frame.assign(predicted=[], correct=[])
    frame["predicted"] = frame["answer"].map(named_disease)
    frame["correct"] = frame["predicted"] == frame["disease"]
    return frame


def naming_accuracy(rows: Sequence[dict[str, Any]]) -> float:
    table = naming_table(rows)
    return float(table["correct"].mean()) if len(table) else float("nan")


def confusion_matrix(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """True disease (rows) by named disease (columns, 'none' when no disease is named)."""
    table = naming_table(rows)
    predicted = table["predicted"].fillna("none")
    matrix = pd.crosstab(table["disease"], predicted)
    columns = [c for c in sorted(DISEASES_BY_SLUG) if c in matrix.columns or c in matrix.index] + (["none"] if "none" in matrix.columns else [])
    return matrix.reindex(columns=columns, fill_value=0)


def answer_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """What a string can tell about a variant's answers: naming accuracy, mean length in tokens, and
    the share that never emitted the end-of-turn token (the paper's Appendix B symptom of deep pruning)."""
    frame = pd.DataFrame(rows)
    return {
        "naming accuracy": naming_accuracy(rows),
        "mean answer tokens": float(frame["new_tokens"].mean()),
        "never stopped": float((~frame["stopped"].astype(bool)).mean()) if "stopped" in frame else float("nan"),
    }


def peak_memory_gib() -> dict[str, float]:
    """Peak memory of this process so far: resident RAM, and allocated GPU memory when on CUDA.

    A notebook's kernel is one process, so at the end of a stage this is the stage's peak.
    """
    import resource
    import sys

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks = {"peak RAM (GiB)": round(peak_rss / (2**30 if sys.platform == "darwin" else 2**20), 2)}
    if torch.cuda.is_available():
        peaks["peak GPU memory (GiB)"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peaks


class PeakMemory:
    """Peak memory while a block runs: resident RAM sampled every ``interval`` seconds (the process's
    lifetime peak cannot tell one SFT from the next in one kernel), and allocated GPU memory on CUDA.

    ``with PeakMemory() as peak: ...`` then ``peak.gib`` is ``{"peak RAM (GiB)": ..., ...}``.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.gib: dict[str, float] = {}

    def __enter__(self) -> "PeakMemory":
        import threading

        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        for gpu in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            torch.cuda.reset_peak_memory_stats(gpu)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.gib = {"peak RAM (GiB)": round(self._peak / 2**30, 2)}
        peaks = [torch.cuda.max_memory_allocated(gpu) / 2**30 for gpu in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
        if peaks:  # the fullest GPU's peak (what the plan's budget is per GPU), and each GPU's when the model spans several
            self.gib["peak GPU memory (GiB)"] = round(max(peaks), 2)
            if len(peaks) > 1:
                self.gib.update({f"peak GPU {gpu} memory (GiB)": round(peak, 2) for gpu, peak in enumerate(peaks)})
