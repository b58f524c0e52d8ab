import pytest
import torch
from peft import PeftModel

from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DISEASES
from medcomp.loading import decoder_layers, load_llava, load_processor
from medcomp.params import load_params
from medcomp.encoding import IGNORE_INDEX, LeftPadCollator, answer_loss, encode_for_training
from medcomp.training import finetune

ALL = [d.slug for d in DISEASES]


def _examples(root, split="train", per_disease=1):
    return build_conversations(select_split(scan_dermnet(root, ALL).images, split, per_disease=per_disease))


def test_labels_cover_exactly_the_answer_and_its_end(tiny_embedded_model, synthetic_root):
    processor = load_processor(str(tiny_embedded_model))
    example = _examples(synthetic_root)[1]
    encoded = encode_for_training(processor, example)
    answer_ids = encoded["input_ids"][encoded["labels"] != IGNORE_INDEX]
    decoded = processor.tokenizer.decode(answer_ids)
    assert decoded.startswith(example.reference) and "<|im_end|>" in decoded
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((encoded["input_ids"] == image_token).sum()) == 4  # 32 px / patch 16 -> 2 x 2
    assert (encoded["labels"][encoded["input_ids"] == image_token] == IGNORE_INDEX).all()


def test_eos_is_appended_when_the_template_has_none(tiny_llava15_standin, synthetic_root):
    processor = load_processor(str(tiny_llava15_standin))
    encoded = encode_for_training(processor, _examples(synthetic_root)[0])
    assert int(encoded["labels"][-1]) == processor.tokenizer.eos_token_id


def test_answer_loss_matches_the_models_own_loss(tiny_embedded_model, synthetic_root):
    """The left-padded, logits-on-answers-only loss equals transformers' full loss on the same rows."""
    processor = load_processor(str(tiny_embedded_model))
    model = load_llava(str(tiny_embedded_model))
    rows = [encode_for_training(processor, e) for e in _examples(synthetic_root)[:4]]
    ours = answer_loss(model, LeftPadCollator(processor.tokenizer.pad_token_id)(rows))
    reference = torch.stack([model(**{k: v.unsqueeze(0) for k, v in row.items()}).loss for row in rows])
    counts = torch.tensor([float((row["labels"][1:] != IGNORE_INDEX).sum()) for row in rows])
    torch.testing.assert_close(ours, (reference * counts).sum() / counts.sum(), rtol=1e-4, atol=1e-4)


def test_qlora_finetune_learns_saves_and_merges_exactly(tiny_embedded_model, synthetic_root, tmp_path):
    params = load_params("embedded", {"finetune": {"max_steps": 6, "batch_size": 4, "logging_steps": 1, "save_steps": 3,
                                                   "learning_rate": 5e-3, "modules_learning_rate": 5e-3}}).finetune
    examples = _examples(synthetic_root, per_disease=1)[:4]
    result = finetune(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / "ft")
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert result.steps == 6 and losses[-1] < losses[0]
    assert (result.adapter_dir / "adapter_config.json").exists() and (result.merged_dir / "config.json").exists()

    # The merged checkpoint computes what the adapter on the nf4 base computes.
    from medcomp.training import qlora_quantization

    processor = load_processor(str(result.merged_dir))
    batch = LeftPadCollator(processor.tokenizer.pad_token_id)([encode_for_training(processor, e) for e in examples])
    batch.pop("labels"), batch.pop("answer_span")
    merged = load_llava(str(result.merged_dir))
    base = load_llava(str(tiny_embedded_model), quantization_config=qlora_quantization(params))
    adapted = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-2, atol=1e-2)
    # The tower and projector trained in full: the merged ones differ from the starting model's.
    start = load_llava(str(tiny_embedded_model))
    assert not torch.equal(start.model.multi_modal_projector.linear_1.weight, merged.model.multi_modal_projector.linear_1.weight)
    assert len(decoder_layers(merged)) == 4


def test_interrupted_training_resumes_from_checkpoint(tiny_embedded_model, synthetic_root, tmp_path):
    examples = _examples(synthetic_root)[:4]
    first = load_params("embedded", {"finetune": {"max_steps": 2, "batch_size": 2, "save_steps": 2, "logging_steps": 1}}).finetune
    finetune(str(tiny_embedded_model), "float32", "cpu", examples, first, tmp_path / "ft")
    assert (tmp_path / "ft" / "checkpoints" / "checkpoint-2").is_dir()
    longer = load_params("embedded", {"finetune": {"max_steps": 3, "batch_size": 2, "save_steps": 2, "logging_steps": 1}}).finetune
    resumed = finetune(str(tiny_embedded_model), "float32", "cpu", examples, longer, tmp_path / "ft")
    steps_logged = [entry["step"] for entry in resumed.log_history if "loss" in entry]
    assert resumed.steps == 3 and steps_logged[-1] == 3


def test_checkpoints_of_another_setup_are_not_resumed(tiny_embedded_model, synthetic_root, tmp_path):
    examples = _examples(synthetic_root)[:4]
    short = load_params("embedded", {"finetune": {"max_steps": 2, "batch_size": 2, "save_steps": 2}}).finetune
    finetune(str(tiny_embedded_model), "float32", "cpu", examples, short, tmp_path / "ft")
    other = load_params("embedded", {"finetune": {"max_steps": 2, "batch_size": 2, "save_steps": 2, "learning_rate": 1e-5}}).finetune
    result = finetune(str(tiny_embedded_model), "float32", "cpu", examples, other, tmp_path / "ft")
    assert result.train_seconds > 0.05 and [e["step"] for e in result.log_history if "loss" in e][0] == 1


@pytest.mark.parametrize("fixture", ["tiny_embedded_model", "tiny_llava15_standin"])
def test_multi_turn_labels_cover_every_answer_and_nothing_else(fixture, request, synthetic_root):
    from medcomp.data import as_multi_turn

    processor = load_processor(str(request.getfixturevalue(fixture)))
    conversation = as_multi_turn(_examples(synthetic_root))[0]
    assert [t.question_kind for t in conversation.turns] == ["name", "features", "treatment"]
    encoded = encode_for_training(processor, conversation)
    labelled = encoded["labels"] != IGNORE_INDEX
    text = processor.tokenizer.decode(encoded["input_ids"][labelled])
    for turn in conversation.turns:
        assert turn.reference in text and turn.question not in text
    # one end-of-answer token per answer, labelled, so the model learns to stop after each
    eos = processor.tokenizer.eos_token_id
    assert int(((encoded["input_ids"] == eos) & labelled).sum()) == 3
    assert int((encoded["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 4


def test_a_finetune_does_not_depend_on_what_drew_random_numbers_before_it(tiny_embedded_model, synthetic_root, tmp_path):
    """01 built the embedded bootstrap in its own kernel when the cache was cold, which drew random
    numbers before the LoRA initialisation: the adapter then differed from a warm-cache run's
    (``dea22cd1`` against ``75c25ce1``), and 04's second recovery depended on its first. The entry
    points seed themselves."""
    from safetensors.torch import load_file

    examples = _examples(synthetic_root)[:4]
    params = load_params("embedded", {"finetune": {"max_steps": 1, "batch_size": 2, "logging_steps": 1}}).finetune
    adapters = []
    for index, draws in enumerate((0, 1000)):
        torch.rand(draws)
        result = finetune(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / f"ft{index}", seed=3)
        adapters.append(load_file(result.adapter_dir / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_gradient_checkpointing_chooses_the_non_reentrant_variant(tiny_embedded_model, quantization):
    """torch.utils.checkpoint deprecates calls that leave use_reentrant unset (a later torch raises): both
    ways into checkpointing (QLoRA's prepare_model_for_kbit_training and a plain model's) pass it, and a
    training step under checkpointing warns nothing about it."""
    import warnings

    from medcomp.params import FinetuneParams
    from medcomp.training import load_for_finetuning

    params = FinetuneParams(quantization=quantization, compute_dtype="float32", gradient_checkpointing=True)
    model = load_for_finetuning(str(tiny_embedded_model), "float32", "cpu", params)
    checkpoint = model.base_model.model.model.language_model._gradient_checkpointing_func
    assert checkpoint.keywords == {"use_reentrant": False}
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = torch.tensor([[1, 2, 3, 4]])
        model(input_ids=ids, labels=ids).loss.backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]


def test_a_resumed_training_counts_only_its_own_work(tiny_embedded_model, synthetic_root, tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint, a training resumes at step 3: the cost table counts that one step's tokens,
    not the checkpoint's two steps again (the trainer's state carries them over)."""
    from medcomp import costs, training
    from transformers import TrainerCallback

    monkeypatch.setenv(costs.LEDGER_ENV, str(tmp_path / "costs.jsonl"))
    examples = _examples(synthetic_root)[:4]
    params = load_params("embedded", {"finetune": {"max_steps": 3, "batch_size": 2, "save_steps": 2, "logging_steps": 1}}).finetune
    bar = training._one_progress_bar

    class Killed(Exception):
        pass

    def killed_after_step_2():
        class KillAfterTwo(bar()):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 3:
                    raise Killed

        return KillAfterTwo

    monkeypatch.setattr(training, "_one_progress_bar", killed_after_step_2)
    with pytest.raises(Killed):
        finetune(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / "ft")
    assert (tmp_path / "ft" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(training, "_one_progress_bar", bar)
    resumed = finetune(str(tiny_embedded_model), "float32", "cpu", examples, params, tmp_path / "ft")
    assert resumed.steps == 3
    total = max(entry["num_input_tokens_seen"] for entry in resumed.log_history if "num_input_tokens_seen" in entry)
    [killed, finished] = [entry for entry in costs.read_ledger(tmp_path / "costs.jsonl") if entry["kind"] == "training"]
    assert killed["tokens"] is None and 0 < finished["tokens"] < total / 2  # one step of three
