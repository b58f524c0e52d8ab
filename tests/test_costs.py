"""The cost table: FLOPs counted from a config, the ledger's nesting and sums, the GEMM peaks, an answer pass recorded."""

from __future__ import annotations

import json

import pytest
import torch

from medcomp import costs


def _llama(**overrides):
    from conftest import _tiny_llama

    return _tiny_llama(1000, **overrides)


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"head_dim": 32}])
def test_linear_parameters_are_the_decoder_linears_of_the_model_built(overrides):
    """GQA (fewer key/value heads) and a head_dim apart from hidden/heads change the count: a formula that
    ignored either would count the wrong work."""
    model = _llama(**overrides)
    built = sum(module.weight.numel() for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and ".layers." in name)
    assert costs.linear_parameters(model.config) == built


def test_forward_flops_count_linears_attention_and_head():
    config = _llama().config
    linears = 2 * costs.linear_parameters(config)
    head = 2 * config.hidden_size * config.vocab_size
    assert costs.forward_flops(config, 10) == 10 * (linears + head)
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * (config.hidden_size // config.num_attention_heads) * 50
    assert costs.forward_flops(config, 10, context=50, logits=1) == 10 * (linears + attention) + head
    assert costs.training_flops(config, 10) == 2 * costs.forward_flops(config, 10)


def test_the_ledger_nests_sums_the_short_and_leaves_the_rest_to_the_stage(tmp_path, monkeypatch):
    ledger = tmp_path / "costs.jsonl"
    monkeypatch.setenv(costs.LEDGER_ENV, str(ledger))
    clock = iter([0.0, 1.0, 3.0, 4.0, 9.0, 20.0, 20.0, 21.0])  # outer 0-20 holds inner 1-3 and 4-9; then a short one 20-21
    monkeypatch.setattr(costs.time, "perf_counter", lambda: next(clock))
    with costs.operation("ranking", "ranking") as outer:
        for _ in range(2):
            with costs.operation("answers", "answer pass") as inner:
                inner.flops, inner.tokens = 3e9, 100
    with costs.operation("tiny", "answer pass"):
        pass
    entries = costs.read_ledger(ledger)
    assert [(e["name"], e.get("nested", False), e["seconds"]) for e in entries] == [
        ("answers", True, 2.0), ("answers", True, 5.0), ("ranking", False, 20.0), ("tiny", False, 1.0)]
    assert entries[2]["flops"] == 6e9 and entries[2]["tokens"] == 200 and outer.flops == 6e9  # the inner work, added up
    rows = costs.cost_rows(entries, stage_seconds=50.0, peaks={"float32": 100.0})
    assert [row["seconds"] for row in rows] == [20.0, 1.0, 29.0]  # ranking; the short one; the rest of the 50 s
    assert rows[0]["GFLOP/s"] == 0.3 and rows[0]["% of peak"] == 0.3 and rows[0]["% of stage"] == 40.0
    assert rows[1]["operation"].startswith("1 shorter operation") and rows[2]["operation"].startswith("the rest")


def test_no_ledger_no_file_and_an_operation_that_raises_is_still_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv(costs.LEDGER_ENV, raising=False)
    with costs.operation("unrecorded", "search"):
        pass
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(costs.LEDGER_ENV, str(tmp_path / "costs.jsonl"))
    with pytest.raises(RuntimeError), costs.operation("failed search", "search"):
        raise RuntimeError("out of memory")
    assert [e["name"] for e in costs.read_ledger(tmp_path / "costs.jsonl")] == ["failed search"]


def test_the_peaks_are_measured_per_dtype_in_a_child_and_fp32_beats_fp16_on_a_cpu():
    """On every CPU these machines have had, fp16 GEMM is tens of times slower than fp32 (no fp16 arithmetic):
    the reason searches run in fp32 here (quantizers.search_dtype)."""
    measured = costs.peaks_in_child(1)
    peaks = measured["GFLOP/s"]
    assert set(peaks) == {"float32", "bfloat16", "float16"} and all(value > 0 for value in peaks.values())
    assert measured["threads"] == 1 and measured["shape"] == list(costs.GEMM_SHAPE)
    if not torch.cuda.is_available():
        assert peaks["float32"] > 3 * peaks["float16"], peaks


def test_an_answer_pass_records_its_tokens_and_work(tiny_embedded_model, synthetic_root, tmp_path, monkeypatch):
    from medcomp.data import DERMNET_FOLDER_RULES, build_conversations, scan_dermnet
    from medcomp.evaluation import generate_answers
    from medcomp.knowledge import DISEASES_BY_SLUG
    from medcomp.loading import load_llava, load_processor

    monkeypatch.setenv(costs.LEDGER_ENV, str(tmp_path / "costs.jsonl"))
    scan = scan_dermnet(synthetic_root, tuple(DISEASES_BY_SLUG), DERMNET_FOLDER_RULES)
    examples = build_conversations([image for image in scan.images if image.split == "test"])[:4]
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    rows = generate_answers(model, processor, examples, max_new_tokens=5, batch_size=2, description="answering (tiny)", progress=False)
    [entry] = costs.read_ledger(tmp_path / "costs.jsonl")
    assert entry["name"] == "answering (tiny)" and entry["kind"] == "answer pass" and entry["dtype"] == "float32"
    generated = sum(row["new_tokens"] for row in rows)
    prompts = sum(len(processor(text=processor.apply_chat_template(e.prompt_messages(), add_generation_prompt=True),
                                images=[__import__("medcomp.data", fromlist=["load_rgb"]).load_rgb(e.image)])["input_ids"][0]) for e in examples)
    assert entry["tokens"] == prompts + generated
    per_token = 2 * costs.linear_parameters(model.config)
    assert entry["flops"] >= entry["tokens"] * per_token


def test_a_child_process_started_inside_an_operation_records_inside_it(tmp_path, monkeypatch):
    """GPTQModel's search runs in a child process that records its own operation: inside the parent's "quantize"
    operation it must not be counted twice; started outside one, it is a top-level operation."""
    import subprocess
    import sys

    monkeypatch.setenv(costs.LEDGER_ENV, str(tmp_path / "costs.jsonl"))
    monkeypatch.delenv(costs.OPEN_ENV, raising=False)
    child = [sys.executable, "-c", "from medcomp.costs import operation\nwith operation('search', 'search'): pass"]
    with costs.operation("quantize", "search"):
        subprocess.run(child, check=True)
    subprocess.run(child, check=True)
    entries = costs.read_ledger(tmp_path / "costs.jsonl")
    assert [(e["name"], bool(e.get("nested"))) for e in entries] == [("search", True), ("quantize", False), ("search", False)]
    assert costs.OPEN_ENV not in __import__("os").environ
