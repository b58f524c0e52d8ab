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


def test_greedy_tokens_drops_ended_rows_and_matches_generate_token_for_token(tiny_embedded_model, synthetic_root):
    """The row-dropping loop is ``generate``'s greedy search: same tokens for every row, whether a row
    ends first, last or never, on a left-padded batch (float64: no near-tie can flip between the two
    batch shapes)."""
    from medcomp.evaluation import greedy_tokens
    from medcomp.data import load_rgb
    from medcomp.loading import to_model

    examples = build_conversations(select_split(scan_dermnet(synthetic_root, [d.slug for d in DISEASES]).images, "test", total=3))
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    model = model.double()
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True) for e in examples[:6]]
    inputs = to_model(processor(text=texts, images=[load_rgb(e.image) for e in examples[:6]], return_tensors="pt", padding=True), model)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch is left-padded"
    free = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)[:, inputs["input_ids"].shape[1]:]
    # end tokens the random model does emit, at different steps in different rows
    ends = {int(free[0, 2]), int(free[3, 6])}
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=sorted(ends))[:, inputs["input_ids"].shape[1]:]
    expected = []
    for row in generated.tolist():  # up to and including a row's first end token; generate pads after it
        ended = next((i for i, t in enumerate(row) if t in ends), None)
        expected.append(row if ended is None else row[: ended + 1])
    got = greedy_tokens(model, inputs, 12, ends)
    assert got == expected
    lengths = sorted({len(row) for row in got})
    assert len(lengths) >= 2 and lengths[0] < 12, f"rows must end at different steps to test the dropping: {lengths}"
