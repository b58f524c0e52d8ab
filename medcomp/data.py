"""DermNet in Kaggle's folder layout → labelled images → LLaVA VQA conversations.

``scan_dermnet`` reads ``<root>/{train,test}/<folder>/<file>``, decides each photo's disease from
its folder plus file name (``DERMNET_FOLDER_RULES``), and keeps a visible list of every file it
skipped and why. ``build_conversations`` turns labelled images into (image, question, reference)
examples in the chat format every LLaVA processor understands.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pandas as pd
from PIL import Image, UnidentifiedImageError

from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES_BY_SLUG, QUESTIONS, question, reference_answer

if TYPE_CHECKING:
    from medcomp.params import Params

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DatasetError(ValueError):
    """The data on disk cannot produce the dataset the params ask for."""


@dataclass(frozen=True)
class LabelledImage:
    path: str
    disease: str  # slug from medcomp.knowledge
    split: str


@dataclass
class DermnetScan:
    images: list[LabelledImage]
    skipped: list[dict[str, str]] = field(default_factory=list)  # path, reason

    def counts(self) -> pd.DataFrame:
        """Images per disease and split (zeros included, so a missing class is visible)."""
        frame = pd.DataFrame([vars(image) for image in self.images], columns=["path", "disease", "split"])
        diseases = sorted({rule["disease"] for rule in DERMNET_FOLDER_RULES} | set(frame["disease"]))
        table = frame.groupby(["disease", "split"]).size().unstack(fill_value=0)
        splits = ["train", "test"] + (["validation"] if "validation" in set(frame["split"]) else [])
        return table.reindex(index=diseases, columns=splits, fill_value=0)

    def skipped_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.skipped, columns=["path", "reason"])


EVERY_FILE = "*"


def compile_name_pattern(pattern: str) -> re.Pattern[str]:
    """A rule's pattern, matched anywhere in a file stem on word boundaries, case-insensitively.

    Letters and digits are word characters; "-", "_", "." and spaces separate words (Python's ``\\b``
    would treat "_" as part of a word). ``*`` matches every name.
    """
    if pattern == EVERY_FILE:
        return re.compile("")
    try:
        return re.compile(rf"(?<![a-z0-9])(?:{pattern})(?![a-z0-9])", re.IGNORECASE)
    except re.error as error:
        raise DatasetError(f"folder rule pattern {pattern!r} is not a valid regular expression: {error}") from error


def _compile_rules(rules: Iterable[dict[str, str]]) -> list[tuple[str, str, re.Pattern[str]]]:
    compiled = []
    for rule in rules:
        if rule["disease"] not in DISEASES_BY_SLUG:
            raise DatasetError(f"folder rule names unknown disease {rule['disease']!r}; known: {sorted(DISEASES_BY_SLUG)}")
        compiled.append((rule["disease"], rule["folder"], compile_name_pattern(rule["pattern"])))
    return compiled


def disease_of(folder: str, stem: str, rules: Sequence[tuple[str, str, re.Pattern[str]]]) -> tuple[str | None, str | None]:
    """(disease, None) if exactly one disease's rule claims ``stem`` in ``folder``, else (None, why not)."""
    matches = sorted({slug for slug, rule_folder, pattern in rules if rule_folder == folder and pattern.search(stem)})
    if len(matches) == 1:
        return matches[0], None
    if not matches:
        return None, "no rule matches this file name"
    return None, f"ambiguous: the name matches {' and '.join(matches)}"


def _is_readable_image(path: Path) -> str | None:
    """None if PIL can open and verify ``path``, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"unreadable image: {type(error).__name__}: {error}"


def scan_dermnet(
    root: Path | str,
    diseases: Sequence[str],
    rules: Iterable[dict[str, str]] = DERMNET_FOLDER_RULES,
    splits: Sequence[str] = ("train", "test"),
) -> DermnetScan:
    """Label every photo under ``root/<split>/<folder>/`` that a rule assigns to one of ``diseases``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root {root} does not exist (expected DermNet's train/ and test/ folders)")
    compiled = [rule for rule in _compile_rules(rules) if rule[0] in diseases]
    folders = {folder for _, folder, _ in compiled}
    images: list[LabelledImage] = []
    skipped: list[dict[str, str]] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir} is missing: DermNet's layout has {list(splits)} folders under the root")
        for folder in sorted(folders):
            folder_dir = split_dir / folder
            if not folder_dir.is_dir():
                continue
            for path in sorted(folder_dir.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append({"path": str(path), "reason": "not an image file"})
                    continue
                disease, why_not = disease_of(folder, path.stem, compiled)
                if disease is None:
                    skipped.append({"path": str(path), "reason": why_not})
                    continue
                problem = _is_readable_image(path)
                if problem:
                    skipped.append({"path": str(path), "reason": problem})
                    continue
                images.append(LabelledImage(str(path), disease, split))
    scan = DermnetScan(images, skipped)
    counts = scan.counts()
    empty = [(disease, split) for disease in diseases for split in splits if counts.loc[disease, split] == 0]
    if empty:
        listed = ", ".join(f"{disease} in {split}/" for disease, split in empty)
        raise DatasetError(f"no usable images for {listed} under {root}; check the folder rules and the skipped files")
    return scan


def select_split(
    images: Sequence[LabelledImage],
    split: str,
    per_disease: int | None = None,
    total: int | None = None,
    seed: int = 0,
) -> list[LabelledImage]:
    """A seeded, disease-balanced subset: up to ``per_disease`` each, then round-robin to ``total``."""
    rng = random.Random(seed)
    by_disease: dict[str, list[LabelledImage]] = {}
    for image in images:
        if image.split == split:
            by_disease.setdefault(image.disease, []).append(image)
    for pool in by_disease.values():
        rng.shuffle(pool)
        if per_disease is not None:
            del pool[per_disease:]
    chosen: list[LabelledImage] = []
    queues = [list(by_disease[d]) for d in sorted(by_disease)]
    while any(queues) and (total is None or len(chosen) < total):
        for queue in queues:
            if queue and (total is None or len(chosen) < total):
                chosen.append(queue.pop(0))
    return chosen


@dataclass(frozen=True)
class VQAExample:
    image: str
    disease: str
    question_kind: str
    question: str
    reference: str

    def prompt_messages(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]

    def messages(self) -> list[dict[str, Any]]:
        return self.prompt_messages() + [{"role": "assistant", "content": [{"type": "text", "text": self.reference}]}]


@dataclass(frozen=True)
class VQAConversation:
    """One image and its questions asked in turn, as the paper's training conversations are (section
    3.1): "What is the name of this disease?" -> "This is X.", then the follow-ups about X."""

    image: str
    disease: str
    turns: tuple[VQAExample, ...]

    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate(self.turns):
            content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": turn.question}]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": turn.reference}]}]
        return messages


def as_multi_turn(examples: Sequence[VQAExample]) -> list[VQAConversation]:
    """Group single-question examples by image into one conversation each, in question order."""
    by_image: dict[str, list[VQAExample]] = {}
    for example in examples:
        by_image.setdefault(example.image, []).append(example)
    order = list(QUESTIONS)
    return [VQAConversation(image, turns[0].disease, tuple(sorted(turns, key=lambda e: order.index(e.question_kind) if e.question_kind in order else len(order))))
            for image, turns in by_image.items()]


def build_conversations(images: Sequence[LabelledImage], question_kinds: Sequence[str] = tuple(QUESTIONS)) -> list[VQAExample]:
    """Three questions per image (name, clinical features, treatment), answered from the knowledge base.

    As in the paper, the follow-up questions name the disease; only the first asks for it.
    """
    examples = []
    for image in images:
        disease = DISEASES_BY_SLUG[image.disease]
        for kind in question_kinds:
            examples.append(VQAExample(image.path, image.disease, kind, question(disease, kind), reference_answer(disease, kind)))
    return examples


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


@dataclass
class PreparedDataset:
    root: Path
    scan: DermnetScan
    train_images: list[LabelledImage]
    test_images: list[LabelledImage]
    train: list[VQAExample]
    test: list[VQAExample]
    validation_images: list[LabelledImage] = field(default_factory=list)
    validation: list[VQAExample] = field(default_factory=list)  # for choosing recipes (08); never the test set
    validation_dropped: int = 0  # validation images whose pixels a train or test image repeats

    def split_counts(self) -> pd.DataFrame:
        """Images used per disease in this run (after sampling), next to what the root holds."""
        used = pd.DataFrame(
            [(i.disease, "train used") for i in self.train_images] + [(i.disease, "test used") for i in self.test_images],
            columns=["disease", "split"],
        )
        used_counts = used.groupby(["disease", "split"]).size().unstack(fill_value=0)
        available = self.scan.counts().rename(columns={"train": "train available", "test": "test available"})
        return available.join(used_counts, how="left").fillna(0).astype(int)


def synthetic_root(params: "Params") -> Path:
    from medcomp.files import content_hash

    key = params.data.synthetic.model_dump() | ({"validation_per_disease": n} if (n := params.data.validation_per_disease) else {})
    return params.runtime.cache_path() / "datasets" / f"dermnet-synthetic-{content_hash(key)}"


def pixel_hash(path: str) -> str:
    """A hash of an image's decoded pixels: two files of the same picture match whatever their names or encodings."""
    import hashlib

    return hashlib.sha256(load_rgb(path).tobytes()).hexdigest()


def validation_split(scan: DermnetScan, train: list[LabelledImage], test: list[LabelledImage], per_disease: int,
                     seed: int) -> tuple[list[LabelledImage], list[LabelledImage], int]:
    """(validation, train, dropped): ``per_disease`` images of the root's ``validation/`` split if it has one, else held
    out of ``train`` (seeded, so train shrinks by them); any whose pixels a train or test image repeats is dropped."""
    if per_disease == 0:
        return [], train, 0
    if any(image.split == "validation" for image in scan.images):
        chosen = select_split(scan.images, "validation", per_disease=per_disease, seed=seed)
    else:
        chosen = select_split(train, "train", per_disease=per_disease, seed=seed + 1)
        held_out = {image.path for image in chosen}
        train = [image for image in train if image.path not in held_out]
    seen = {pixel_hash(image.path) for image in [*train, *test]}
    kept = [image for image in chosen if pixel_hash(image.path) not in seen]
    return kept, train, len(chosen) - len(kept)


def check_layout(params: "Params") -> None:
    """Fail now, naming the folder, if ``data.root`` lacks DermNet's layout: ``train/`` and ``test/``, and in each a
    folder the rules need for every disease. Opens no image (a second on Kaggle's 19,500 photos), so a run
    whose dataset was not attached stops before the model's 14 GB download, not after. Synthetic roots are
    generated by the run itself and pass."""
    data = params.data
    if data.root == "synthetic":
        return
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist (expected DermNet's train/ and test/ folders; on Kaggle, attach the "
                           "dataset and point data.root at it)")
    rules = [rule.model_dump() for rule in data.folder_rules] if data.folder_rules else DERMNET_FOLDER_RULES
    needed = sorted({(rule["disease"], rule["folder"]) for rule in rules if rule["disease"] in data.diseases})
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DatasetError(f"data.root {root} has no {split}/ folder: DermNet's layout is <root>/train/<folder>/ and <root>/test/<folder>/")
        for disease in data.diseases:
            folders = [folder for slug, folder in needed if slug == disease]
            if not any((root / split / folder).is_dir() for folder in folders):
                raise DatasetError(f"data.root {root}: no folder for {disease} under {split}/ (looked for {folders or 'a folder rule'})")


def prepare_dataset(params: "Params") -> PreparedDataset:
    """Resolve the data root (generating the synthetic one once), label it, sample and build VQA."""
    data = params.data
    if data.root == "synthetic":
        from medcomp.synthetic import generate_dermnet_like

        from medcomp.files import build_once

        root = synthetic_root(params)
        build_once(root, lambda p: (p / "test").is_dir(), lambda: generate_dermnet_like(root, **data.synthetic.model_dump(),
                                                                                          validation_per_disease=data.validation_per_disease))
    else:
        root = Path(data.root).expanduser()
    rules = [rule.model_dump() for rule in data.folder_rules] if data.folder_rules else DERMNET_FOLDER_RULES
    splits = ("train", "test", "validation") if (root / "validation").is_dir() and data.validation_per_disease else ("train", "test")
    scan = scan_dermnet(root, data.diseases, rules, splits)
    train_images = select_split(scan.images, "train", per_disease=data.max_train_images_per_disease, seed=params.seed)
    test_images = select_split(scan.images, "test", total=data.test_images, seed=params.seed)
    validation, train_images, dropped = validation_split(scan, train_images, test_images, data.validation_per_disease, params.seed)
    return PreparedDataset(root, scan, train_images, test_images, build_conversations(train_images), build_conversations(test_images),
                           validation, build_conversations(validation), dropped)
