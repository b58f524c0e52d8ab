"""Recovery by distillation: the pruned student learns the finetuned teacher's answer-token distributions (08_beyond, issue 32).

Minitron (Muralidharan et al., 2024) recovers pruned LLMs with logit distillation from the unpruned teacher, and
found it better than ground-truth SFT at a fraction of the data. Here the loss is, over the answer tokens only
(as 04's SFT loss),

    alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))  +  (1 − alpha) · cross-entropy(student, reference)

with the teacher's distribution kept on its ``top_k`` tokens (renormalised): at a 49k-token vocabulary the full
logits of every training answer would take gigabytes, and the top 64 hold nearly all of a finetuned model's mass
(``TeacherTargets.mass`` says how much). The teacher's outputs are computed once, in one no-grad pass before
training over the examples the student's steps will draw (the teacher and the student are never on the GPU
together: on a T4 each needs most of it), and cached by teacher checkpoint, data, steps and ``top_k``; a training
step then costs one student forward and backward.
Written here rather than taken from a library: TRL's ``GKDTrainer`` runs the teacher at every step and on whole
sequences; this loss must match 04's (answer tokens, same batches) to compare the two fairly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from medcomp.costs import forward_flops, model_dtype, operation
from medcomp.encoding import IGNORE_INDEX, LeftPadCollator, encode_for_training
from medcomp.loading import to_model


@dataclass
class TeacherTargets:
    """Per training example (keyed by its index in the training set), the teacher's top-k logits and their token ids
    at each answer position (the positions 04's loss scores, in order). Only the examples the student will see need
    be there (``training.visited_indices``)."""

    logits: dict[int, torch.Tensor]  # (answer tokens, k) float32
    indices: dict[int, torch.Tensor]  # (answer tokens, k) int64
    mass: float  # mean probability (at temperature 1) the top k hold
    identity: str  # teacher checkpoint, data and k: what the cache is valid for

    def save(self, path: Path) -> None:
        from medcomp.files import atomic_write_bytes

        import io

        buffer = io.BytesIO()
        torch.save({"logits": self.logits, "indices": self.indices, "mass": self.mass, "identity": self.identity}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "TeacherTargets":
        saved = torch.load(path, weights_only=True)
        return cls(saved["logits"], saved["indices"], float(saved["mass"]), saved["identity"])


def _answer_logits(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at every position a label follows (row-major), their targets, and how many each row has: the
    positions and order of ``encoding.answer_loss``."""
    batch = dict(batch)
    batch.pop("example_index", None)
    labels, span = batch.pop("labels"), int(batch.pop("answer_span"))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**batch, use_cache=False).last_hidden_state[:, -span:-1]
    targets = labels[:, -(span - 1):]
    keep = targets != IGNORE_INDEX
    return base.lm_head(hidden[keep]).float(), targets[keep], keep.sum(dim=1)


@torch.no_grad()
def teacher_targets(teacher, processor, examples: Sequence[Any], top_k: int = 64, batch_size: int = 16, identity: str = "",
                    only: Sequence[int] | None = None) -> TeacherTargets:
    """One no-grad pass of ``teacher`` over ``examples`` (``VQAExample`` or ``VQAConversation``), or over those at the
    indices ``only`` (the ones training will draw), keeping the top ``top_k`` logits of every answer position."""
    from tqdm.auto import tqdm

    teacher.eval()
    collate = LeftPadCollator(processor.tokenizer.pad_token_id)
    wanted = sorted(set(only)) if only is not None else list(range(len(examples)))
    logits_out, indices_out, mass = {}, {}, []
    with operation(f"teacher pass ({len(wanted)} sequences)", "answer pass", model_dtype(teacher)) as work:
        work.flops, work.tokens = 0.0, 0
        for start in tqdm(range(0, len(wanted), batch_size), desc="teacher targets", unit="batch"):
            chunk = wanted[start:start + batch_size]
            batch = collate([encode_for_training(processor, examples[i]) for i in chunk])
            logits, _, counts = _answer_logits(teacher, to_model(batch, teacher))
            positions = int(batch["attention_mask"].sum())
            work.flops += forward_flops(teacher.config, positions, context=batch["attention_mask"].shape[1] / 2)
            work.tokens += positions
            top = logits.topk(top_k, dim=-1)
            mass.append(torch.softmax(logits, dim=-1).gather(1, top.indices).sum(-1))
            for i, values, ids in zip(chunk, top.values.cpu().split(counts.tolist()), top.indices.cpu().split(counts.tolist())):
                logits_out[i], indices_out[i] = values.clone(), ids.clone()
    return TeacherTargets(logits_out, indices_out, float(torch.cat(mass).mean()), identity)


def distillation_loss(model, batch: dict[str, Any], targets: TeacherTargets, temperature: float = 2.0, alpha: float = 1.0,
                      num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """``alpha`` · T² · KL(teacher ‖ student) on the teacher's top-k + (1 − alpha) · 04's answer loss, averaged over
    ``num_items`` answer tokens (the accumulated batch, as Trainer counts them) or this batch's."""
    index = batch["example_index"].tolist()
    missing = [i for i in index if i not in targets.logits]
    if missing:
        raise ValueError(f"teacher targets lack training examples {missing[:5]}: the cache was built for other data, steps or seed")
    logits, labels, _ = _answer_logits(model, batch)
    count = num_items if num_items is not None else labels.numel()
    teacher_logits = torch.cat([targets.logits[i] for i in index]).to(logits.device)
    teacher_ids = torch.cat([targets.indices[i] for i in index]).to(logits.device)
    if teacher_logits.shape[0] != logits.shape[0]:
        raise ValueError(f"teacher targets cover {teacher_logits.shape[0]} answer tokens, the batch has {logits.shape[0]}: "
                         "the cache was built for other data or another tokenizer")
    loss = torch.zeros((), device=logits.device)
    if alpha > 0:
        teacher = torch.softmax(teacher_logits / temperature, dim=-1)
        student = torch.log_softmax(logits / temperature, dim=-1).gather(1, teacher_ids)
        kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - student)).sum()
        loss = loss + alpha * temperature ** 2 * kl / count
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(logits, labels, reduction="sum") / count
    return loss


@dataclass(frozen=True)
class Distillation:
    """What ``training.finetune`` needs to distil instead of (or besides) plain SFT."""

    targets: TeacherTargets
    temperature: float
    alpha: float

    def describe(self) -> list[Any]:
        return [self.targets.identity, self.temperature, self.alpha]
