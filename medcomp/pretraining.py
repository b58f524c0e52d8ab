"""Pretrain the embedded LLaVA the way LLaVA-1.5 is pretrained, in miniature, once per settings.

Real LLaVA-1.5 starts from a CLIP tower pretrained on image-caption pairs and a projector aligned in
LLaVA's stage 1 (language model and tower frozen, the projector learns to caption images); the
paper's finetune then only adds QLoRA. The embedded model has no pretrained tower to download, so
``python -m medcomp bootstrap`` builds both steps here, on a synthetic *pretraining* set drawn by
the dataset's generator from its own seed (disjoint from every train and test image, checked) and
captioned in visual words only (``synthetic.CAPTIONS``). No step here ever sees a disease name:
naming is still learned in ``01_finetune``, as on the real model.

1. ``pretrain_vision_tower``: CLIP-style contrastive learning of the tower against frozen
   all-MiniLM-L6-v2 embeddings of the captions (the text side of CLIP, here a sentence model
   that ships offline), on exactly the features LLaVA reads (``vision_feature_layer``).
2. LLaVA's stage 1 (``training.train_modules_only`` on ``stage1_examples``): "Describe the lesion."
   -> caption, projector only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from medcomp.costs import operation
from medcomp.data import VQAExample, load_rgb
from medcomp.files import atomic_write_json
from medcomp.loading import PROJECTOR, load_llava, load_processor, load_sentence_model, save_with_processor
from medcomp.params import FinetuneParams
from medcomp.training import train_modules_only

STAGE1_PROMPT = "Describe the lesion."


@dataclass(frozen=True)
class CaptionedImage:
    path: str
    group: str  # the generator's drawing class; used only to know which captions fit an image
    caption: str


def read_captioned_images(root: Path | str) -> list[CaptionedImage]:
    root = Path(root)
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [CaptionedImage(str(root / row["image"]), row["group"], row["caption"]) for row in rows]


def pixel_fingerprints(paths: Sequence[str]) -> set[str]:
    """Hashes of decoded pixels: two files with the same picture collide whatever their names."""
    return {hashlib.sha256(np.asarray(load_rgb(path)).tobytes()).hexdigest() for path in paths}


def assert_disjoint(pretraining: Sequence[str], dataset: Sequence[str]) -> None:
    """Raise if any pretraining image is pixel-identical to a train or test image."""
    shared = pixel_fingerprints(pretraining) & pixel_fingerprints(dataset)
    if shared:
        raise ValueError(f"{len(shared)} pretraining images are identical to train/test images: use another pretraining seed")


@dataclass
class VisionPretrainingResult:
    losses: list[float]
    heldout_caption_accuracy: float  # share of held-out images whose nearest caption is one of their group's
    heldout_images: int
    seconds: float


def _reading_features(tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """Mean patch feature of the layer LLaVA reads (CLS dropped, as 'default' selection does).

    With ``vision_feature_layer=-2`` and a 2-layer tower that is the *first* layer's output: the last
    layer and ``post_layernorm`` get no gradient, and need none.
    """
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    return hidden[:, 1:].mean(dim=1)


def pretrain_vision_tower(
    model,
    processor,
    images: Sequence[CaptionedImage],
    sentence_model,
    steps: int,
    batch_size: int,
    learning_rate: float,
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> VisionPretrainingResult:
    """Contrastive pretraining of ``model``'s vision tower in place (CLIP's objective, text side frozen).

    Every image is scored against every distinct caption (cosine of a linear head on its features and
    the caption's sentence embedding, learned temperature); the loss is the negative log of the
    softmax mass on its own group's captions, since an image fits any of them.
    """
    generator = torch.Generator().manual_seed(seed)
    captions = sorted({image.caption for image in images})
    groups = sorted({image.group for image in images})
    caption_group = torch.tensor([groups.index(next(i.group for i in images if i.caption == c)) for c in captions])
    with torch.no_grad():
        text = torch.nn.functional.normalize(torch.as_tensor(sentence_model.encode(captions, convert_to_numpy=True)), dim=-1)
    image_group = torch.tensor([groups.index(image.group) for image in images])
    pixels = processor.image_processor([load_rgb(image.path) for image in images], return_tensors="pt")["pixel_values"]

    order = torch.randperm(len(images), generator=generator)
    heldout = order[: max(1, int(len(images) * heldout_fraction))]
    train = order[len(heldout) :]
    tower = model.model.vision_tower
    feature_layer = model.config.vision_feature_layer
    head = torch.nn.Linear(tower.config.hidden_size, text.shape[1])
    log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))  # CLIP's initial temperature
    tower.train()
    trainable = [p for p in tower.parameters()] + list(head.parameters()) + [log_scale]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, fused=True)  # vendor-independent sqrt: training._optimizer
    positive = (caption_group[None, :] == image_group[:, None])  # image x caption

    def logits(indices: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(head(_reading_features(tower, pixels[indices], feature_layer)), dim=-1)
        return features @ text.T * log_scale.exp().clamp(max=100)

    losses = []
    started = time.perf_counter()
    with operation(f"bootstrap: vision pretraining ({steps} steps)", "training", str(pixels.dtype).removeprefix("torch.")) as work:
        work.notes = "the tower's full weights: work not counted (a vision transformer, not the language model)"
        for _ in tqdm(range(steps), desc="vision pretraining", unit="step"):
            batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
            log_probs = logits(batch).log_softmax(dim=-1)
            loss = -torch.logsumexp(log_probs.masked_fill(~positive[batch], float("-inf")), dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    seconds = time.perf_counter() - started
    tower.eval()
    with torch.no_grad():
        nearest = torch.cat([logits(chunk).argmax(dim=-1) for chunk in heldout.split(256)])
        accuracy = float((caption_group[nearest] == image_group[heldout]).float().mean())
    return VisionPretrainingResult(losses, accuracy, len(heldout), seconds)


def stage1_examples(images: Sequence[CaptionedImage]) -> list[VQAExample]:
    """LLaVA stage-1 pairs: the image, a fixed instruction, its caption as the answer."""
    return [VQAExample(image.path, image.group, "caption", STAGE1_PROMPT, image.caption) for image in images]


def build_pretrained_embedded_llava(
    assembled_dir: Path,
    output_dir: Path,
    pretraining_root: Path,
    dataset_images: Sequence[str],
    settings: dict[str, Any],
    sentence_model_id: str = "packaged",
    seed: int = 0,
) -> Path:
    """Assembled model -> vision-pretrained (cached) -> stage-1 aligned (cached) at ``output_dir``."""
    images = read_captioned_images(pretraining_root)
    assert_disjoint([image.path for image in images], dataset_images)
    report: dict[str, Any] = {"pretraining images": len(images), "distinct captions": len({i.caption for i in images})}

    vision_dir = output_dir.parent / f"{output_dir.name}.vision"
    if not (vision_dir / "config.json").exists():
        model, processor = load_llava(str(assembled_dir)), load_processor(str(assembled_dir))
        sentence_model = load_sentence_model(sentence_model_id)
        torch.manual_seed(seed)
        vision = pretrain_vision_tower(model, processor, images, sentence_model, settings["vision_steps"],
                                       settings["vision_batch_size"], settings["vision_learning_rate"], seed=seed)
        save_with_processor(model, processor, vision_dir)
        atomic_write_json(vision_dir / "vision_pretraining.json", asdict(vision))
    vision_report = json.loads((vision_dir / "vision_pretraining.json").read_text())
    report |= {"vision pretraining steps": len(vision_report["losses"]),
               "vision pretraining held-out caption accuracy": vision_report["heldout_caption_accuracy"],
               "vision pretraining (s)": round(vision_report["seconds"], 1)}

    stage1 = FinetuneParams(
        quantization="none", compute_dtype="float32", fully_trained_modules=("multi_modal_projector",),
        max_steps=settings["stage1_steps"], batch_size=settings["stage1_batch_size"],
        modules_learning_rate=settings["stage1_learning_rate"], warmup_ratio=0.05,
        mixed_precision="no", logging_steps=5, save_steps=10_000,
    )
    work_dir = output_dir.parent / f"{output_dir.name}.stage1-work"  # checkpoints while stage 1 runs
    aligned = train_modules_only(str(vision_dir), "float32", "cpu", stage1_examples(images), stage1, work_dir, seed=seed, target_dir=output_dir)
    report |= {"stage 1 steps": aligned.steps, "stage 1 first loss": aligned.first_loss, "stage 1 last loss": aligned.final_loss,
               "stage 1 (s)": round(aligned.train_seconds, 1), "stage 1 trained": PROJECTOR}
    atomic_write_json(output_dir / "pretraining.json", report)
    shutil.rmtree(work_dir, ignore_errors=True)
    return output_dir


def pretraining_report(model_dir: Path | str) -> dict[str, Any]:
    """What the bootstrap recorded about how a pretrained embedded model was made ({} otherwise)."""
    path = Path(model_dir) / "pretraining.json"
    return json.loads(path.read_text()) if path.exists() else {}
