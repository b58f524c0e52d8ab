import random

import pytest
from PIL import Image

from medcomp.data import DatasetError, build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DERMNET_FOLDER_RULES, DISEASES, DISEASES_BY_SLUG, QUESTIONS
from medcomp.synthetic import DISTRACTORS, draw_lesion_image, generate_dermnet_like

ALL = [d.slug for d in DISEASES]


def test_knowledge_base_covers_the_papers_eight_diseases():
    assert {d.name for d in DISEASES} == {
        "rosacea", "actinic keratosis", "basal cell carcinoma", "dermatitis",
        "melanoma", "psoriasis", "lichen planus", "seborrheic keratosis",
    }
    for disease in DISEASES:
        assert disease.features.lower().startswith(disease.name) and disease.treatment.lower().startswith(disease.name)
    assert {rule["disease"] for rule in DERMNET_FOLDER_RULES} == set(ALL)


def test_generator_writes_dermnet_layout_and_names(synthetic_root):
    for split in ("train", "test"):
        for rule in DERMNET_FOLDER_RULES:
            folder = synthetic_root / split / rule["folder"]
            assert any(p.name.startswith(rule["disease"]) for p in folder.glob("*.jpg")), folder
    assert (synthetic_root / "train" / "Acne and Rosacea Photos" / "acne-cystic-1.jpg").exists()


def test_generator_is_seeded(tmp_path):
    first = generate_dermnet_like(tmp_path / "a", 1, 1, 1, image_size=24, seed=7)
    second = generate_dermnet_like(tmp_path / "b", 1, 1, 1, image_size=24, seed=7)
    files = sorted(p.relative_to(first) for p in first.rglob("*.jpg"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.jpg"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_diseases_look_different():
    """Mean colour alone separates some classes: the cues are real, not labels in disguise."""
    rng = random.Random(0)
    means = {slug: [sum(c) / 3 for c in Image.Image.getdata(draw_lesion_image(slug, rng, 48).resize((1, 1)))][0] for slug in ("melanoma", "basal-cell-carcinoma")}
    assert means["melanoma"] < means["basal-cell-carcinoma"]


def test_scan_labels_by_folder_and_file_name(synthetic_root):
    scan = scan_dermnet(synthetic_root, ALL)
    counts = scan.counts()
    assert (counts["train"] == 3).all() and (counts["test"] == 2).all()
    folder = "Psoriasis pictures Lichen Planus and related diseases"
    by_path = {image.path: image.disease for image in scan.images}
    assert by_path[str(synthetic_root / "train" / folder / "lichen-planus-1.jpg")] == "lichen-planus"
    assert by_path[str(synthetic_root / "train" / folder / "psoriasis-1.jpg")] == "psoriasis"
    skipped = scan.skipped_table()
    assert len(skipped) == 2 * 3 * len(DISTRACTORS)  # every distractor listed, none silently dropped
    assert set(skipped["reason"]) == {"no rule matches this file name"}


def test_corrupt_and_non_image_files_are_listed(tmp_path):
    root = generate_dermnet_like(tmp_path / "d", 2, 1, 0, image_size=24)
    folder = root / "train" / "Melanoma Skin Cancer Nevi and Moles"
    (folder / "melanoma-99.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("hello")
    scan = scan_dermnet(root, ALL)
    reasons = dict(zip(scan.skipped_table()["path"], scan.skipped_table()["reason"]))
    assert reasons[str(folder / "melanoma-99.jpg")].startswith("unreadable image")
    assert reasons[str(folder / "notes.txt")] == "not an image file"
    assert scan.counts().loc["melanoma", "train"] == 2


def test_a_disease_without_images_is_a_clear_error(tmp_path):
    root = generate_dermnet_like(tmp_path / "d", 1, 1, 0, image_size=24)
    for path in (root / "test" / "Melanoma Skin Cancer Nevi and Moles").glob("melanoma-*"):
        path.unlink()
    with pytest.raises(DatasetError, match="melanoma in test/"):
        scan_dermnet(root, ALL)
    assert scan_dermnet(root, [s for s in ALL if s != "melanoma"]).counts().shape[0] == 8


def test_missing_root_and_split(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dermnet(tmp_path / "missing", ALL)
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="test"):
        scan_dermnet(tmp_path, ALL)


def test_overridden_rules(synthetic_root):
    rules = [{"disease": "melanoma", "folder": "Melanoma Skin Cancer Nevi and Moles", "pattern": r"(melanoma|nevus)"},
             {"disease": "psoriasis", "folder": "Psoriasis pictures Lichen Planus and related diseases", "pattern": "psoriasis"}]
    scan = scan_dermnet(synthetic_root, ["melanoma", "psoriasis"], rules)
    assert scan.counts().loc["melanoma", "train"] == 3 + 3  # nevus photos now count as melanoma


def test_select_split_is_balanced_and_seeded(synthetic_root):
    images = scan_dermnet(synthetic_root, ALL).images
    test = select_split(images, "test", total=13, seed=3)
    assert len(test) == 13 and len({i.path for i in test}) == 13
    per_disease = {slug: sum(i.disease == slug for i in test) for slug in ALL}
    assert max(per_disease.values()) - min(per_disease.values()) <= 1
    assert test == select_split(images, "test", total=13, seed=3)
    assert len(select_split(images, "train", per_disease=2)) == 16


def test_conversations_three_questions_per_image(synthetic_root):
    images = select_split(scan_dermnet(synthetic_root, ALL).images, "test", total=4)
    examples = build_conversations(images)
    assert len(examples) == 12 and {e.question_kind for e in examples} == set(QUESTIONS)
    name = next(e for e in examples if e.question_kind == "name")
    assert name.reference == f"This is {DISEASES_BY_SLUG[name.disease].name}."
    assert name.question == "What is the name of this disease?"  # only this one must be read from the image
    features = next(e for e in examples if e.question_kind == "features" and e.image == name.image)
    assert features.question == f"What are the clinical features of {DISEASES_BY_SLUG[name.disease].name}?"  # the paper's follow-up names it
    messages = name.messages()
    assert messages[0]["content"][0] == {"type": "image"} and messages[1]["role"] == "assistant"


@pytest.mark.parametrize("stem, disease", [
    ("malignant-melanoma-back-3", "melanoma"),
    ("Melanoma_Acral_12", "melanoma"),
    ("lichen-planus-oral-7", "lichen-planus"),
    ("oral-lichen-planus-2", "lichen-planus"),
    ("basal-cell-carcinoma-nose-1", "basal-cell-carcinoma"),
    ("actinic-keratoses-hands-04", "actinic-keratosis"),
    ("psoriasis-scalp-11", "psoriasis"),
])
def test_rules_match_the_diseases_words_anywhere_in_the_name(stem, disease):
    from medcomp.data import _compile_rules, disease_of
    from medcomp.knowledge import DERMNET_FOLDER_RULES

    rules = _compile_rules(DERMNET_FOLDER_RULES)
    folder = next(rule["folder"] for rule in DERMNET_FOLDER_RULES if rule["disease"] == disease)
    assert disease_of(folder, stem, rules) == (disease, None)


def test_rules_respect_word_boundaries_and_skip_ambiguous_names():
    from medcomp.data import _compile_rules, disease_of
    from medcomp.knowledge import DERMNET_FOLDER_RULES

    rules = _compile_rules(DERMNET_FOLDER_RULES)
    malignant = "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions"
    assert disease_of(malignant, "squamous-cell-carcinoma-3", rules) == (None, "no rule matches this file name")
    assert disease_of(malignant, "hyperbasal-cellular-1", rules)[0] is None  # words, not substrings
    disease, reason = disease_of(malignant, "actinic-keratosis-and-basal-cell-carcinoma-2", rules)
    assert disease is None and reason == "ambiguous: the name matches actinic-keratosis and basal-cell-carcinoma"
    assert disease_of("Atopic Dermatitis Photos", "eczema-hands-5", rules) == ("dermatitis", None)  # '*' claims the folder


def test_ambiguous_files_are_listed_with_their_reason(tmp_path):
    root = generate_dermnet_like(tmp_path / "d", 1, 1, 0, image_size=24)
    folder = root / "train" / "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions"
    source = next(folder.glob("basal-cell-carcinoma-*.jpg"))
    (folder / "actinic-keratosis-vs-basal-cell-carcinoma-1.jpg").write_bytes(source.read_bytes())
    scan = scan_dermnet(root, ALL)
    reasons = dict(zip(scan.skipped_table()["path"], scan.skipped_table()["reason"]))
    assert reasons[str(folder / "actinic-keratosis-vs-basal-cell-carcinoma-1.jpg")].startswith("ambiguous")


def test_an_invalid_rule_pattern_is_a_clear_error(synthetic_root):
    rules = [{"disease": "melanoma", "folder": "Melanoma Skin Cancer Nevi and Moles", "pattern": "melanoma("}]
    with pytest.raises(DatasetError, match="not a valid regular expression"):
        scan_dermnet(synthetic_root, ["melanoma"], rules)
