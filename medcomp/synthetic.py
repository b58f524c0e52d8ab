"""A seeded synthetic stand-in for Kaggle DermNet, written in exactly its folder layout.

The embedded world cannot download DermNet, so it draws skin-like images whose lesions carry the
textbook visual cue of each disease (colour, shape, scale, distribution). Skin tone, lesion count,
size, position and noise vary per image, so a model has to look at the lesion, not memorise pixels.
The files go into DermNet's own folders with DermNet-style names, next to distractor photos of
other diseases in the same folders, so the embedded world exercises the real loader and its rules.
These images are a test fixture for the pipeline, not medical data.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medcomp.files import atomic_directory
from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES

# Other diseases that share DermNet's folders with the 8 (their rules must skip them).
DISTRACTORS: tuple[tuple[str, str], ...] = (
    ("Acne and Rosacea Photos", "acne-cystic"),
    ("Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions", "squamous-cell-carcinoma"),
    ("Melanoma Skin Cancer Nevi and Moles", "nevus-junctional"),
    ("Seborrheic Keratoses and other Benign Tumors", "dermatofibroma"),
)


# What the generator draws for each disease, in plain visual words, three ways. These are the
# embedded model's pretraining captions (CLIP-style vision pretraining and LLaVA's stage 1): like
# real CLIP and LLaVA pretraining data they describe what is seen and never name a disease, so
# naming must still be learned in 01_finetune. A test keeps disease names out of them.
CAPTIONS: dict[str, tuple[str, ...]] = {
    "rosacea": (
        "a large blurred red patch dotted with small dark red bumps",
        "a broad soft-edged red flush with scattered tiny red dots",
        "a wide area of diffuse redness with several small red papules",
    ),
    "actinic-keratosis": (
        "two to four rough yellow-tan patches speckled with white flecks",
        "several irregular tan patches with ragged edges and pale specks",
        "scattered yellowish rough plaques sprinkled with white scale",
    ),
    "basal-cell-carcinoma": (
        "a single pale pink round dome with a darker rim and thin red lines",
        "one smooth pearly pink circle with a raised border and fine red vessels",
        "a round translucent pink nodule outlined by a ring and crossed by red threads",
    ),
    "dermatitis": (
        "a large blurred orange-red patch with dark red scratch lines",
        "an ill-defined reddish orange area crossed by thin dark streaks",
        "a soft-edged orange patch with several straight dark scratch marks",
    ),
    "melanoma": (
        "an irregular dark brown blotch with black and lighter brown areas",
        "one asymmetric spot in several shades of brown and black with a ragged border",
        "a large uneven dark mark mixing black, brown and tan",
    ),
    "psoriasis": (
        "one to three sharply bordered red ovals covered by silvery white scale",
        "well-defined oval red plaques with a thick white centre and a red rim",
        "oval plaques of white scale, each ringed by a thin red border",
    ),
    "lichen-planus": (
        "many small flat purple polygons with thin white lines",
        "a scatter of violet angular spots, each crossed by a short white line",
        "numerous small purple flat-topped bumps spread across the skin",
    ),
    "seborrheic-keratosis": (
        "a brown rounded rectangle with dark dots that looks stuck on the skin",
        "one waxy brown plaque with a sharp edge and darker specks",
        "a flat brown oblong plaque sprinkled with small dark dots",
    ),
}


def _folder_of(slug: str) -> str:
    return next(rule["folder"] for rule in DERMNET_FOLDER_RULES if rule["disease"] == slug)


def _jitter(rng: random.Random, color: tuple[int, int, int], spread: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-spread, spread))) for c in color)  # type: ignore[return-value]


def _blob(draw: ImageDraw.ImageDraw, rng: random.Random, cx: float, cy: float, radius: float, color, points: int = 14, roughness: float = 0.35) -> None:
    import math

    vertices = []
    for k in range(points):
        angle = 2 * math.pi * k / points
        r = radius * (1 + rng.uniform(-roughness, roughness))
        vertices.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    draw.polygon(vertices, fill=color)


def _random_point(rng: random.Random, size: int, margin: float = 0.2) -> tuple[float, float]:
    return rng.uniform(margin * size, (1 - margin) * size), rng.uniform(margin * size, (1 - margin) * size)


def draw_lesion_image(slug: str, rng: random.Random, size: int) -> Image.Image:
    """One synthetic photo of ``slug`` (a disease slug or a distractor name)."""
    tone = rng.uniform(0.75, 1.05)  # lighter to darker skin, hue kept plausible
    skin = _jitter(rng, (int(235 * tone), int(185 * tone), int(155 * tone)), 8)
    image = Image.new("RGB", (size, size), skin)
    draw = ImageDraw.Draw(image)
    s = size
    # Each disease gets its own dominant colour and a lesion shape after its textbook description;
    # lesions are large enough to fill several 16-px patches of the embedded vision tower.
    if slug == "rosacea":  # diffuse central red flush with small papules
        _blob(draw, rng, *_random_point(rng, s, 0.4), s * rng.uniform(0.32, 0.42), _jitter(rng, (215, 55, 65)), roughness=0.15)
        image = image.filter(ImageFilter.GaussianBlur(s / 20))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(5, 10)):
            x, y = _random_point(rng, s, 0.25)
            r = s * 0.03
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (180, 30, 45)))
    elif slug == "actinic-keratosis":  # rough yellow-tan crusted patches with white scale specks
        for _ in range(rng.randint(2, 4)):
            x, y = _random_point(rng, s)
            _blob(draw, rng, x, y, s * rng.uniform(0.12, 0.18), _jitter(rng, (215, 175, 105)), roughness=0.5)
            for _ in range(20):
                px, py = x + rng.uniform(-0.1, 0.1) * s, y + rng.uniform(-0.1, 0.1) * s
                draw.point((px, py), fill=_jitter(rng, (250, 245, 230), 5))
    elif slug == "basal-cell-carcinoma":  # pearly pink dome, rolled rim, fine red vessels
        x, y = _random_point(rng, s, 0.35)
        r = s * rng.uniform(0.2, 0.28)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (240, 200, 215), 8), outline=_jitter(rng, (205, 150, 170)), width=max(2, s // 24))
        for _ in range(rng.randint(3, 5)):
            draw.line((x + rng.uniform(-r, r) * 0.7, y + rng.uniform(-r, r) * 0.7, x + rng.uniform(-r, r) * 0.7, y + rng.uniform(-r, r) * 0.7), fill=(190, 30, 50), width=max(1, s // 48))
    elif slug == "dermatitis":  # ill-defined orange-red patch with scratch marks
        _blob(draw, rng, *_random_point(rng, s, 0.35), s * rng.uniform(0.3, 0.4), _jitter(rng, (230, 120, 55)), roughness=0.5)
        image = image.filter(ImageFilter.GaussianBlur(s / 24))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(5, 9)):
            x, y = _random_point(rng, s, 0.2)
            draw.line((x, y, x + rng.uniform(-0.2, 0.2) * s, y + rng.uniform(-0.2, 0.2) * s), fill=_jitter(rng, (150, 40, 30)), width=max(1, s // 48))
    elif slug == "melanoma":  # asymmetric, irregular, multi-shade black-brown lesion
        x, y = _random_point(rng, s, 0.35)
        r = s * rng.uniform(0.2, 0.28)
        _blob(draw, rng, x, y, r, _jitter(rng, (70, 40, 30), 8), roughness=0.45)
        _blob(draw, rng, x + r * 0.3, y - r * 0.2, r * 0.55, _jitter(rng, (25, 15, 15), 6), roughness=0.5)
        _blob(draw, rng, x - r * 0.35, y + r * 0.25, r * 0.3, _jitter(rng, (110, 60, 45), 8), roughness=0.5)
    elif slug == "psoriasis":  # sharply bordered plaques under thick silvery-white scale
        for _ in range(rng.randint(1, 3)):
            x, y = _random_point(rng, s)
            rx, ry = s * rng.uniform(0.15, 0.24), s * rng.uniform(0.1, 0.16)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=_jitter(rng, (200, 50, 60)))
            draw.ellipse((x - rx * 0.8, y - ry * 0.75, x + rx * 0.8, y + ry * 0.75), fill=_jitter(rng, (225, 228, 238), 6))
    elif slug == "lichen-planus":  # violet polygonal flat papules with white striae
        for _ in range(rng.randint(8, 14)):
            x, y = _random_point(rng, s, 0.15)
            _blob(draw, rng, x, y, s * rng.uniform(0.05, 0.08), _jitter(rng, (115, 55, 140)), points=6, roughness=0.15)
            draw.line((x - s * 0.03, y, x + s * 0.03, y), fill=(235, 230, 240), width=1)
    elif slug == "seborrheic-keratosis":  # stuck-on waxy brown plaque with keratin dots
        x, y = _random_point(rng, s, 0.35)
        rx, ry = s * rng.uniform(0.2, 0.28), s * rng.uniform(0.14, 0.2)
        draw.rounded_rectangle((x - rx, y - ry, x + rx, y + ry), radius=int(ry * 0.6), fill=_jitter(rng, (145, 100, 55)))
        for _ in range(25):
            px, py = x + rng.uniform(-rx, rx) * 0.8, y + rng.uniform(-ry, ry) * 0.8
            draw.point((px, py), fill=_jitter(rng, (75, 50, 25)))
    else:  # distractors: a generic lesion, deliberately unlike any of the 8 rules
        x, y = _random_point(rng, s)
        r = s * rng.uniform(0.05, 0.12)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rng, (170, 120, 90), 40))
    # Dermatology photos are close-ups: keep the central 60 %, so the lesion fills most of the frame.
    image = image.crop((int(0.2 * s), int(0.2 * s), int(0.8 * s), int(0.8 * s))).resize((s, s), Image.BILINEAR)
    # Sensor-like noise from the same seed (PIL's effect_noise has an RNG of its own).
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(4, 10), (s, s, 1))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def generate_dermnet_like(
    root: Path | str,
    train_per_disease: int = 30,
    test_per_disease: int = 5,
    distractors_per_folder: int = 3,
    image_size: int = 96,
    seed: int = 0,
    validation_per_disease: int = 0,
) -> Path:
    """Write ``root/{train,test}/<DermNet folder>/<disease>-<n>.jpg`` atomically and return ``root``; with
    ``validation_per_disease``, ``root/validation/`` too, drawn after test so train and test are the same images."""
    rng = random.Random(seed)
    root = Path(root)
    with atomic_directory(root) as staging:
        splits = (("train", train_per_disease), ("test", test_per_disease), *((("validation", validation_per_disease),) if validation_per_disease else ()))
        for split, per_disease in splits:
            for disease in DISEASES:
                folder = staging / split / _folder_of(disease.slug)
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(1, per_disease + 1):
                    draw_lesion_image(disease.slug, rng, image_size).save(folder / f"{disease.slug}-{index}.jpg", quality=92)
            for folder_name, stem in DISTRACTORS:
                folder = staging / split / folder_name
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(1, distractors_per_folder + 1):
                    draw_lesion_image(stem, rng, image_size).save(folder / f"{stem}-{index}.jpg", quality=92)
    return root


def generate_captioned_images(
    root: Path | str,
    per_disease: int,
    image_size: int = 96,
    seed: int = 1000,
) -> Path:
    """The embedded model's pretraining set: ``root/images/<n>.jpg`` and ``root/captions.jsonl``.

    Drawn by the same generator as the DermNet-layout dataset but from its own seed, and captioned
    with ``CAPTIONS`` (one of its disease's three, chosen by the seed), never with a disease name.
    File names are neutral numbers, so nothing downstream can read a label from them.
    """
    import json

    rng = random.Random(seed)
    root = Path(root)
    with atomic_directory(root) as staging:
        (staging / "images").mkdir()
        rows = []
        for index in range(per_disease * len(DISEASES)):
            disease = DISEASES[index % len(DISEASES)]
            path = staging / "images" / f"{index:05d}.jpg"
            draw_lesion_image(disease.slug, rng, image_size).save(path, quality=92)
            rows.append({"image": f"images/{path.name}", "group": disease.slug, "caption": rng.choice(CAPTIONS[disease.slug])})
        (staging / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root
