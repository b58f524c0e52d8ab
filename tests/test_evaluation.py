import pytest
import torch

from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.evaluation import confusion_matrix, generate_answers, named_disease, naming_accuracy, peak_memory_gib
from medcomp.knowledge import DISEASES
from medcomp.loading import load_llava, load_processor


def test_named_disease_takes_the_first_disease_mentioned():
    assert named_disease("This is seborrheic keratosis.") == "seborrheic-keratosis"
    assert named_disease("Likely melanoma, not a seborrheic keratosis") == "melanoma"
    assert named_disease("This looks like eczema") == "dermatitis"
    assert named_disease("Actinic keratoses are ...") == "actinic-keratosis"
    assert named_disease("I cannot tell") is None
    assert named_disease("This is not dermatitisx") is None


def test_accuracy_and_confusion():
    rows = [
        {"question_kind": "name", "disease": "melanoma", "answer": "This is melanoma."},
        {"question_kind": "name", "disease": "psoriasis", "answer": "This is rosacea."},
        {"question_kind": "name", "disease": "rosacea", "answer": "No idea."},
        {"question_kind": "features", "disease": "rosacea", "answer": "melanoma"},
    ]
    assert naming_accuracy(rows) == 1 / 3
    matrix = confusion_matrix(rows)
    assert matrix.loc["psoriasis", "rosacea"] == 1 and matrix.loc["rosacea", "none"] == 1


def test_generate_answers_batched_rows(tiny_embedded_model, synthetic_root):
    examples = build_conversations(select_split(scan_dermnet(synthetic_root, [d.slug for d in DISEASES]).images, "test", total=3))
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    rows = generate_answers(model, processor, examples, max_new_tokens=4, batch_size=4)
    assert len(rows) == 9
    assert {"image", "question", "reference", "answer", "disease", "question_kind"} <= set(rows[0])
    single = generate_answers(model, processor, examples[:1], max_new_tokens=4, batch_size=1)
    assert single[0]["answer"] == rows[0]["answer"]  # left padding does not change greedy answers


def test_peak_memory_matches_the_kernels_high_water_mark():
    block = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    peak = peak_memory_gib()["peak RAM (GiB)"]
    high_water_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    assert peak == pytest.approx(high_water_kib / 2**20, abs=0.02)
    assert peak > 0.29
    del block
