"""What the model should know: the paper's 8 diseases, and where DermNet keeps their photos.

The descriptions follow standard dermatology references (e.g. DermNet NZ, AAD patient guidance);
they are the reference answers of the VQA task, so they are written as short answers a clinician
would accept. Each answer names the disease first, so every question teaches the image-to-name link.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Disease:
    slug: str
    name: str
    aliases: tuple[str, ...]
    features: str
    treatment: str


DISEASES: tuple[Disease, ...] = (
    Disease(
        slug="rosacea",
        name="rosacea",
        aliases=("rosacea",),
        features=(
            "Rosacea is a chronic facial skin condition with persistent central redness, flushing, "
            "visible small blood vessels and acne-like papules and pustules without comedones."
        ),
        treatment=(
            "Rosacea is treated by avoiding triggers, daily sun protection, topical metronidazole, "
            "azelaic acid or ivermectin, oral doxycycline, and laser for visible vessels."
        ),
    ),
    Disease(
        slug="actinic-keratosis",
        name="actinic keratosis",
        aliases=("actinic keratosis", "actinic keratoses", "solar keratosis", "solar keratoses"),
        features=(
            "Actinic keratosis is a precancerous lesion of sun-damaged skin: a rough, dry, scaly "
            "pink or tan patch on the face, scalp or hands that may progress to squamous cell carcinoma."
        ),
        treatment=(
            "Actinic keratosis is treated with cryotherapy, topical fluorouracil, imiquimod or "
            "diclofenac, photodynamic therapy, and strict sun protection."
        ),
    ),
    Disease(
        slug="basal-cell-carcinoma",
        name="basal cell carcinoma",
        aliases=("basal cell carcinoma", "basal cell carcinomas", "bcc"),
        features=(
            "Basal cell carcinoma is a slow-growing skin cancer that appears as a pearly, "
            "translucent papule with a rolled border and fine surface blood vessels, sometimes ulcerated."
        ),
        treatment=(
            "Basal cell carcinoma is treated by surgical excision or Mohs surgery, curettage, "
            "cryotherapy, topical imiquimod, or radiotherapy, with regular skin checks."
        ),
    ),
    Disease(
        slug="dermatitis",
        name="dermatitis",
        aliases=("dermatitis", "eczema", "atopic dermatitis"),
        features=(
            "Dermatitis is an itchy inflammation of the skin with ill-defined red patches, dryness, "
            "fine scaling, scratch marks and, when acute, oozing or crusting."
        ),
        treatment=(
            "Dermatitis is treated with regular emollients, avoiding irritants and triggers, "
            "topical corticosteroids or calcineurin inhibitors, and antihistamines for itch."
        ),
    ),
    Disease(
        slug="melanoma",
        name="melanoma",
        aliases=("melanoma", "melanomas", "malignant melanoma"),
        features=(
            "Melanoma is a dangerous skin cancer of pigment cells: an asymmetric mole with an "
            "irregular border, several shades of brown or black, a diameter over 6 mm, and change over time."
        ),
        treatment=(
            "Melanoma is treated by prompt wide surgical excision, sentinel lymph node biopsy, and "
            "for advanced disease immunotherapy or targeted therapy."
        ),
    ),
    Disease(
        slug="psoriasis",
        name="psoriasis",
        aliases=("psoriasis",),
        features=(
            "Psoriasis is a chronic immune-mediated disease with well-demarcated red plaques covered "
            "by silvery-white scale, often on the elbows, knees and scalp, with nail pitting."
        ),
        treatment=(
            "Psoriasis is treated with topical corticosteroids and vitamin D analogues, "
            "phototherapy, methotrexate, and biologic drugs for severe disease."
        ),
    ),
    Disease(
        slug="lichen-planus",
        name="lichen planus",
        aliases=("lichen planus",),
        features=(
            "Lichen planus is an inflammatory condition with itchy, flat-topped, shiny, purple "
            "polygonal papules crossed by fine white lines, often on the wrists and in the mouth."
        ),
        treatment=(
            "Lichen planus is treated with potent topical corticosteroids, antihistamines for itch, "
            "and oral corticosteroids, retinoids or phototherapy for widespread disease."
        ),
    ),
    Disease(
        slug="seborrheic-keratosis",
        name="seborrheic keratosis",
        aliases=("seborrheic keratosis", "seborrheic keratoses", "seborrhoeic keratosis"),
        features=(
            "Seborrheic keratosis is a benign growth of older skin: a waxy, warty, stuck-on "
            "looking tan to dark brown plaque with a well-defined edge, not linked to cancer."
        ),
        treatment=(
            "Seborrheic keratosis needs no treatment; irritated or unsightly lesions can be removed "
            "by cryotherapy, curettage or electrocautery."
        ),
    ),
)

DISEASES_BY_SLUG: dict[str, Disease] = {disease.slug: disease for disease in DISEASES}

# Kaggle DermNet (shubhamgoel27/dermnet) keeps several of the 8 diseases in one of its 23 folders,
# so a photo's disease is its folder plus the disease's words in its file name. File names carry
# other words before and after (body site, subtype, qualifiers: "malignant-melanoma-back-3.jpg",
# "lichen-planus-oral-12.jpg"), so a pattern matches anywhere in the name, case-insensitively, on
# word boundaries ("-", "_", " ", "." and digits' edges count); a name matching two of the chosen
# diseases is skipped as ambiguous. ``*`` claims every file of a folder. The separator between words
# is written ``[-_ ]``. Override with ``data.folder_rules`` in a params file.
DERMNET_FOLDER_RULES: tuple[dict[str, str], ...] = (
    {"disease": "rosacea", "folder": "Acne and Rosacea Photos", "pattern": r"rosacea"},
    {"disease": "actinic-keratosis", "folder": "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions", "pattern": r"actinic[-_ ]kerato(?:sis|ses)"},
    {"disease": "basal-cell-carcinoma", "folder": "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions", "pattern": r"basal[-_ ]cell(?:[-_ ]carcinoma)?|bcc"},
    {"disease": "dermatitis", "folder": "Atopic Dermatitis Photos", "pattern": r"*"},
    {"disease": "melanoma", "folder": "Melanoma Skin Cancer Nevi and Moles", "pattern": r"melanomas?"},
    {"disease": "psoriasis", "folder": "Psoriasis pictures Lichen Planus and related diseases", "pattern": r"psoriasis"},
    {"disease": "lichen-planus", "folder": "Psoriasis pictures Lichen Planus and related diseases", "pattern": r"lichen[-_ ]planus"},
    {"disease": "seborrheic-keratosis", "folder": "Seborrheic Keratoses and other Benign Tumors", "pattern": r"seborrh?o?eic[-_ ]kerato(?:sis|ses)|seb[-_ ]k"},
)

# The paper's conversation format (section 3.1): the image's disease is asked for first, and the
# follow-up questions name it ("What is the name of this disease?" ... "What is a seborrheic
# keratosis?"). So only the first answer must be read from the image; the others test knowledge.
QUESTIONS: dict[str, str] = {
    "name": "What is the name of this disease?",
    "features": "What are the clinical features of {name}?",
    "treatment": "How is {name} treated?",
}


def question(disease: Disease, question_kind: str) -> str:
    if question_kind not in QUESTIONS:
        raise ValueError(f"unknown question kind {question_kind!r}; expected one of {sorted(QUESTIONS)}")
    return QUESTIONS[question_kind].format(name=disease.name)


def reference_answer(disease: Disease, question_kind: str) -> str:
    if question_kind == "name":
        return f"This is {disease.name}."
    if question_kind == "features":
        return disease.features
    if question_kind == "treatment":
        return disease.treatment
    raise ValueError(f"unknown question kind {question_kind!r}; expected one of {sorted(QUESTIONS)}")
