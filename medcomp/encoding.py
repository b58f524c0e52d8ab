"""Conversations to tokens and labels: answer-only labels, left-padded batches, the answer loss.

Training (01, 04, the embedded model's stage 1) and the forward-only layer criteria of 02 read the same
encoding, so a label that is off by one would show in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from medcomp.data import VQAConversation, VQAExample, load_rgb


IGNORE_INDEX = -100


def encode_for_training(processor, example: VQAExample | VQAConversation) -> dict[str, torch.Tensor]:
    """Tokenise one conversation (one image, one or more question/answer turns) with labels on the
    answer tokens only.

    Each answer's span is found by rendering the processor's own chat template up to the answer's
    prompt and up to its end; tokenising every such prefix must give a prefix of the whole
    conversation's tokens (checked, not assumed). Templates that end an assistant turn without EOS
    (llava-1.5's) get one after every answer, as LLaVA's own training separator is: a model that never
    sees one never learns to stop.
    """
    messages = example.messages()
    image = load_rgb(example.image)

    def tokens(text: str) -> torch.Tensor:
        return processor(text=text, images=image, return_tensors="pt")["input_ids"][0]

    full_text = processor.apply_chat_template(messages)
    full = processor(text=full_text, images=image, return_tensors="pt")
    input_ids = full["input_ids"][0]
    eos_id, eos_text = processor.tokenizer.eos_token_id, processor.tokenizer.eos_token
    pieces: list[tuple[torch.Tensor, bool]] = []  # (token run, is an answer)
    cursor = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = processor.apply_chat_template(messages[:turn], add_generation_prompt=True)
        upto_text = processor.apply_chat_template(messages[: turn + 1])
        if not (full_text.startswith(prompt_text) and full_text.startswith(upto_text)):
            raise ValueError("the chat template does not render each turn as a prefix of the conversation")
        start, end = _shared_prefix(input_ids, tokens(prompt_text)), _shared_prefix(input_ids, tokens(upto_text))
        pieces += [(input_ids[cursor:start], False), (input_ids[start:end], True)]
        if eos_id is not None and eos_text not in upto_text[len(prompt_text) :]:
            pieces.append((torch.tensor([eos_id]), True))
        cursor = end
    pieces.append((input_ids[cursor:], False))
    ids = torch.cat([run for run, _ in pieces])
    labels = torch.cat([run if is_answer else torch.full_like(run, IGNORE_INDEX) for run, is_answer in pieces])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": full["pixel_values"][0], "labels": labels}


def _shared_prefix(whole: torch.Tensor, prefix: torch.Tensor) -> int:
    """How many leading tokens of ``prefix`` the whole conversation shares.

    All of them, or all but the last: a prefix that ends in whitespace (llava-1.5's template puts a
    space after each answer) tokenises that space alone, while inside the conversation it merges
    with the next word. Any other difference means the template does not render turns as prefixes.
    """
    length = min(len(whole), len(prefix))
    mismatch = (whole[:length] != prefix[:length]).nonzero()
    shared = int(mismatch[0]) if len(mismatch) else length
    if shared < len(prefix) - 1:
        raise ValueError("tokenising a turn alone gives different tokens than inside the conversation")
    return shared


class VQATrainingSet(Dataset):
    """``with_index``: each row also carries its position in ``examples`` (distillation looks up the teacher's
    cached outputs by it)."""

    def __init__(self, processor, examples: Sequence[VQAExample | VQAConversation], with_index: bool = False):
        self.processor = processor
        self.examples = list(examples)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = encode_for_training(self.processor, self.examples[index])
        return row | {"example_index": torch.tensor(index)} if self.with_index else row


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
            **({"example_index": torch.stack([row["example_index"] for row in rows])} if "example_index" in rows[0] else {}),
        }


def answer_loss(model, batch: dict[str, torch.Tensor], num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over answer tokens, with the vocabulary projection computed only
    where a label follows: at a 49k-token vocabulary it is a large share of a step, and in a
    multi-turn conversation the questions between answers need none.

    Averaged over ``num_items`` answer tokens when given (the whole accumulated batch, as Trainer
    counts them), else over this batch's answer tokens.
    """
    batch = dict(batch)
    labels, span = batch.pop("labels"), int(batch.pop("answer_span"))
    # Only the last span positions can predict a label; of those, the ones followed by one do.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**batch, use_cache=False).last_hidden_state[:, -span:-1]
    targets = labels[:, -(span - 1) :]
    keep = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[keep])
    total = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    count = num_items if num_items is not None else keep.sum()
    return total / count


def _teacher_forced_batch(processor, examples: Sequence[VQAExample]) -> dict[str, torch.Tensor]:
    return LeftPadCollator(processor.tokenizer.pad_token_id)([encode_for_training(processor, e) for e in examples])


def teacher_forced_batches(processor, calibration: Sequence[VQAExample], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The calibration set tokenised with its reference answers, once for every forward-only criterion."""
    return [_teacher_forced_batch(processor, calibration[start : start + batch_size]) for start in range(0, len(calibration), batch_size)]
