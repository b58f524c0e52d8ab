import pytest
import torch

from medcomp import benchmark
from medcomp.data import build_conversations, scan_dermnet, select_split
from medcomp.knowledge import DISEASES
from medcomp.loading import decoder_layers, load_llava, load_processor
from medcomp.params import BenchmarkParams
from medcomp.runs import Variant


@pytest.fixture(scope="module")
def example(synthetic_root):
    return build_conversations(select_split(scan_dermnet(synthetic_root, [d.slug for d in DISEASES]).images, "test", total=1))[1]


def test_the_clock_forces_the_token_count_and_splits_prefill_from_decode(tiny_embedded_model, example):
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    inputs = benchmark.model_inputs(processor, example, model)
    clock = benchmark.StepClock()
    output = benchmark.decode(model, inputs, 7, clock)
    assert output.shape[1] - inputs["input_ids"].shape[1] == 7
    assert len(clock.times) == 7  # one timestamp per new token, the first ending the prefill
    assert clock.prefill_ms > 0 and clock.decode_ms_per_token > 0


def test_hooks_split_a_decode_step_into_layers_lm_head_and_the_rest(tiny_embedded_model, example):
    model, processor = load_llava(str(tiny_embedded_model)), load_processor(str(tiny_embedded_model))
    inputs = benchmark.model_inputs(processor, example, model)
    clock = benchmark.StepClock()
    split = benchmark.TimeSplit(model, clock)
    benchmark.decode(model, inputs, 6, clock)
    split.remove()
    total = 5 * clock.decode_ms_per_token / 1000
    assert 0 < split.seconds["decoder layers"] < total and 0 < split.seconds["lm_head"] < total
    assert split.seconds["decoder layers"] + split.seconds["lm_head"] < total
    # hooks are gone: a later run adds nothing
    before = dict(split.seconds)
    benchmark.decode(model, inputs, 3, clock)
    assert split.seconds == before


def test_every_variant_is_measured_interleaved_and_a_4_bit_one_is_smaller(tiny_embedded_model, example):
    from medcomp.loading import bnb_4bit_config
    from medcomp.loading import FULL_PRECISION_MODULES

    full = Variant("finetuned", "01_finetune", str(tiny_embedded_model), parameters=1, bits=32)
    nf4 = Variant("finetuned-bnb", "05_quantize", str(tiny_embedded_model), parameters=1, bits=4)
    loads = {"finetuned": lambda: load_llava(str(tiny_embedded_model)),
             "finetuned-bnb": lambda: load_llava(str(tiny_embedded_model), quantization_config=bnb_4bit_config("float32", FULL_PRECISION_MODULES))}
    settings = BenchmarkParams(new_tokens=5, warmup=1, repeats=3)
    measurements = benchmark.benchmark_variants([full, nf4], load_processor(str(tiny_embedded_model)), example, settings, "cpu", 1,
                                                load=lambda v: loads[v.name](), progress=False)
    assert [m.variant for m in measurements] == ["finetuned", "finetuned-bnb"]
    for m in measurements:
        assert len(m.decode_ms) == 3 and len(m.prefill_ms) == 3 and min(m.decode_ms) > 0
        assert m.generation_peak_bytes >= m.resident_bytes and m.first_generation_peak_bytes >= m.resident_bytes
        assert set(m.split_ms) == {"decoder layers", "lm_head", "rest"}
    assert measurements[1].decoder_bytes < measurements[0].decoder_bytes / 3
    table = benchmark.efficiency_table(measurements)
    assert table.loc["finetuned", "decode × finetuned"] == 1.0
    assert table.loc["finetuned-bnb", "weights read per token MB"] < table.loc["finetuned", "weights read per token MB"]


def test_one_resident_variant_at_a_time_gives_the_same_kind_of_record(tiny_embedded_model, example):
    full = Variant("finetuned", "01_finetune", str(tiny_embedded_model), parameters=1, bits=32)
    settings = BenchmarkParams(new_tokens=4, warmup=1, repeats=2, resident="one")
    [m] = benchmark.benchmark_variants([full], load_processor(str(tiny_embedded_model)), example, settings, "cpu", 1,
                                       load=lambda v: load_llava(v.path), progress=False)
    assert len(m.decode_ms) == 2 and m.bytes_per_token > 0


def test_paper_model_bytes_per_token_match_its_config_counted_independently():
    """LLaVA-1.5-7B's language model built on the meta device from its config: weights per layer
    and lm_head counted from real modules, against the closed form used for the T4 bound."""
    import json
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from medcomp.plan import real_config

    config = real_config()["text_config"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    linear_weights = sum(m.weight.numel() for m in decoder_layers_of(model) for m in m.modules() if isinstance(m, torch.nn.Linear))
    expected = 2 * linear_weights + 2 * model.lm_head.weight.numel()
    assert benchmark.paper_model_bytes_per_token(0, 16) == pytest.approx(expected, rel=1e-9)
    four_bit = benchmark.paper_model_bytes_per_token(7, 4, 64)
    assert 2.9e9 < four_bit < 3.1e9  # 25 layers at ~0.54 byte a weight + the fp16 lm_head
    assert 1000 * benchmark.paper_model_bytes_per_token(0, 16) / 320e9 == pytest.approx(41.3, abs=0.2)  # ms/token on a T4


def decoder_layers_of(llama):
    return llama.model.layers


def test_the_memory_probe_sums_every_gpu_of_a_split_model(monkeypatch):
    """Two T4s each holding half a model: the probe reports both halves (simulated CUDA counters)."""
    import torch

    from medcomp.benchmark import MemoryProbe

    allocated, peaks = {0: 7 * 2**30, 1: 6 * 2**30}, {0: 9 * 2**30, 1: 8 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[device])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks[device])
    probe = MemoryProbe("cuda")
    assert probe.now() == 13 * 2**30
    with probe.peak() as found:
        pass
    assert found["peak"] == 17 * 2**30
