"""06_benchmark: parameters, bit width, memory and latency of every variant, measured alike.

**Memory.** On CUDA, the paper's "VRAM": peak allocated GPU memory while the variant generates. On the
CPU, reported apart: the bytes of the model's tensors as stored (4-bit weights packed, with their
scales), and the resident memory (RSS) the variant adds: after warm-up, at the peak of its first
generation (one-time work such as a kernel repacking its weights on first use), and at the peak of a
later generation (what serving it costs). Each is measured from the process's level just before the
variant was loaded, so it holds with other variants resident too. RSS counts the pages of memory-mapped
checkpoint files a variant touched (safetensors are mapped, not copied); that share is reported too,
as the OS can drop those pages under pressure.

**Latency.** Greedy decoding of one fixed test image + question with exactly ``new_tokens`` new
tokens (end-of-turn suppressed), after warm-up, median of ``repeats`` runs, at
``runtime.timing_threads`` threads. A stopping criterion timestamps every step, so prefill (prompt and
image to the first token) and decode (each later token) come apart, measured inside ``generate`` with
its per-step overhead, as a user sees it. With ``resident="all"`` every variant stays loaded and the
timed runs go round by round over all of them, each round in a rotated order, so drift of the machine
hits every variant alike.

**Where a token's time goes.** One extra, untimed decode per variant with forward hooks on every
decoder layer and on the lm_head splits a decode step into decoder layers, lm_head and the rest
(sampling, cache updates, ``generate``'s bookkeeping). Hooks add a little time of their own.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from medcomp.costs import operation
from medcomp.data import VQAExample, load_rgb
from medcomp.files import atomic_write_json
from medcomp.loading import decoder_bytes, decoder_layers, load_variant, tensor_bytes, to_model

RESULTS = "benchmark.json"

# LLaVA-1.5-7B's language model (llava-hf/llava-1.5-7b-hf config): the paper's model, for the T4 bound.
PAPER_MODEL = {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32064}


def _trim_heap() -> None:
    """Give freed heap pages back to the OS, so RSS reflects what is alive (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class MemoryProbe:
    """The process's memory now and its peak over a block: RSS on the CPU, allocated memory on CUDA, summed over every
    GPU (a model split over two T4s holds its weights on both: the paper's "VRAM" is their sum)."""

    def __init__(self, device: str):
        import psutil

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self._process = psutil.Process()

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(torch.cuda.memory_allocated(gpu) for gpu in range(torch.cuda.device_count()))
        return self._process.memory_info().rss

    def file_backed(self) -> int:
        """Resident pages of mapped files (Linux ``RssFile + RssShmem``); 0 on CUDA."""
        return 0 if self.cuda else getattr(self._process.memory_info(), "shared", 0)

    @contextmanager
    def peak(self, interval: float = 0.002) -> Iterator[dict[str, int]]:
        """``with probe.peak() as p: ...`` then ``p["peak"]`` is the highest reading during the block."""
        import threading

        found = {"peak": self.now()}
        if self.cuda:
            gpus = range(torch.cuda.device_count())
            for gpu in gpus:
                torch.cuda.reset_peak_memory_stats(gpu)
            yield found
            torch.cuda.synchronize()
            # each GPU's own peak, summed: an upper bound when their peaks came at different moments (a split model's do not overlap much)
            found["peak"] = max(found["peak"], sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus))
            return
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(interval):
                found["peak"] = max(found["peak"], self._process.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield found
        finally:
            stop.set()
            thread.join()
            found["peak"] = max(found["peak"], self.now())


class StepClock:
    """A stopping criterion that never stops and records when each new token is ready.

    ``generate`` calls it once per step, after the token is chosen; the first call ends the prefill.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.start = 0.0
        self.times: list[float] = []

    def reset(self) -> None:
        self.times = []
        self.start = time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def prefill_ms(self) -> float:
        return 1000 * (self.times[0] - self.start)

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)


class TimeSplit:
    """Forward hooks summing the time spent in decoder layers and in the lm_head during decode steps."""

    def __init__(self, model, clock: StepClock):
        self.clock = clock
        self.seconds = {"decoder layers": 0.0, "lm_head": 0.0}
        self._handles = []
        self._started: dict[int, float] = {}
        for module, part in [*[(layer, "decoder layers") for layer in decoder_layers(model)], (lm_head_of(model), "lm_head")]:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit(part)))

    def _decoding(self) -> bool:
        return bool(self.clock.times)  # the first token is out: every later forward is a decode step

    def _enter(self, module, args) -> None:
        if self._decoding():
            if self.clock.cuda:
                torch.cuda.synchronize()
            self._started[id(module)] = time.perf_counter()

    def _exit(self, part: str):
        def hook(module, args, output) -> None:
            started = self._started.pop(id(module), None)
            if started is not None:
                if self.clock.cuda:
                    torch.cuda.synchronize()
                self.seconds[part] += time.perf_counter() - started

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def lm_head_of(model) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.lm_head


def model_inputs(processor, example: VQAExample, model) -> dict[str, torch.Tensor]:
    """The timed prompt, on ``model``'s device and in its dtype (``loading.to_model``)."""
    text = processor.apply_chat_template(example.prompt_messages(), add_generation_prompt=True)
    return to_model(processor(text=[text], images=[load_rgb(example.image)], return_tensors="pt"), model)


@torch.inference_mode()
def decode(model, inputs: dict[str, torch.Tensor], new_tokens: int, clock: StepClock) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens (end-of-turn suppressed until then)."""
    from transformers import StoppingCriteriaList

    clock.reset()
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([clock]))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every decoder layer and the lm_head (the embedding
    lookup reads one row; the vision tower and projector run only in prefill)."""
    return tensor_bytes(decoder_layers(model)) + sum(p.numel() * p.element_size() for p in lm_head_of(model).parameters())


def paper_model_bytes_per_token(layers_removed: int = 0, bits: int = 16, group_size: int = 64) -> float:
    """The same bytes for LLaVA-1.5-7B's language model: fp16, or 4-bit with an fp16 scale and a
    4-bit zero point per group (AWQ's GEMM layout); the lm_head stays fp16."""
    m = PAPER_MODEL
    per_layer = 4 * m["hidden"] ** 2 + 3 * m["hidden"] * m["intermediate"]
    bytes_per_weight = 2.0 if bits == 16 else bits / 8 + (2 + 0.5) / group_size
    return (m["layers"] - layers_removed) * per_layer * bytes_per_weight + m["vocab"] * m["hidden"] * 2


@dataclass
class Measurement:
    variant: str
    stage: str
    parameters: int | None
    bits: int
    layers: int
    model_bytes: int
    decoder_bytes: int
    bytes_per_token: int
    resident_bytes: int  # added by loading and warming up the variant
    generation_peak_bytes: int  # peak of a later (steady-state) generation, above the level before loading
    load_seconds: float
    first_generation_peak_bytes: int = 0  # peak of the first generation (one-time work included)
    resident_file_bytes: int = 0  # of resident_bytes, pages of memory-mapped files
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    split_ms: dict[str, float] = field(default_factory=dict)  # per decode token, from the hooked run
    memory_kind: str = "RSS"


def _measure_setup(variant, processor, example, settings, device, probe, load) -> tuple[Any, Measurement, dict[str, torch.Tensor], StepClock]:
    """Load, warm up (the first warm-up under the memory probe), split a decode step's time; the
    variant stays loaded."""
    _trim_heap()
    before, before_files = probe.now(), probe.file_backed()
    started = time.perf_counter()
    model = load(variant)
    load_seconds = time.perf_counter() - started
    inputs = model_inputs(processor, example, model)
    clock = StepClock(probe.cuda)
    # The first (warm-up) generation runs under the memory probe: its first-call allocations are part
    # of what serving the variant costs. Its timing is never used.
    with probe.peak() as first:
        decode(model, inputs, settings.new_tokens, clock)
    for _ in range(settings.warmup - 1):
        decode(model, inputs, settings.new_tokens, clock)
    _trim_heap()
    resident, resident_files = probe.now() - before, probe.file_backed() - before_files
    split = TimeSplit(model, clock)
    try:  # the hooked run doubles as the steady-state memory probe (sampled coarsely, not to disturb the split)
        with probe.peak(interval=0.01) as steady:
            decode(model, inputs, settings.new_tokens, clock)
    finally:
        split.remove()
    steps = len(clock.times) - 1
    hooked_ms = clock.decode_ms_per_token
    split_ms = {part: 1000 * seconds / steps for part, seconds in split.seconds.items()}
    split_ms["rest"] = hooked_ms - sum(split_ms.values())
    measurement = Measurement(variant.name, variant.stage, variant.parameters, variant.bits, len(decoder_layers(model)), tensor_bytes(model),
                              decoder_bytes(model),
                              weight_bytes_per_token(model), resident, max(resident, steady["peak"] - before), load_seconds,
                              first_generation_peak_bytes=max(resident, first["peak"] - before), resident_file_bytes=resident_files,
                              split_ms=split_ms, memory_kind="allocated CUDA memory" if probe.cuda else "RSS")
    return model, measurement, inputs, clock


def benchmark_variants(variants: Sequence[Any], processor, example: VQAExample, settings, device: str, threads: int,
                       load=None, progress: bool = True) -> list[Measurement]:
    """Measure ``variants`` (registry entries) as the module docstring says; ``load`` defaults to
    ``loading.load_variant``."""
    load = load or (lambda v: load_variant(v, "float32" if device == "cpu" else "float16", device))
    probe = MemoryProbe(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    with node_timing_lock(), operation(f"timing loop ({len(variants)} variants, {threads} thread{'s' * (threads > 1)})", "timing loop") as work:
        work.tokens = len(variants) * (settings.warmup + settings.repeats) * settings.new_tokens
        return _benchmark(variants, processor, example, settings, device, probe, load, progress, previous_threads)


def node_timing_lock(path: str | None = None):
    """One timing at a time per machine: sweep points running at once on a node (``--executor local``, or Slurm
    jobs sharing one) wait here for each other's 06, so no speed number is measured beside another's load. The
    lock lives in the node's own temp folder, not the shared cache: it is the node that must be quiet."""
    import tempfile

    from filelock import FileLock

    return FileLock(path or f"{tempfile.gettempdir()}/medcomp-timing.lock")


def _benchmark(variants, processor, example, settings, device, probe, load, progress, previous_threads) -> list[Measurement]:
    try:
        measurements: list[Measurement] = []
        if settings.resident == "all":
            loaded = []
            for variant in tqdm(variants, desc="loading, warm-up, memory", unit="variant", disable=not progress):
                model, measurement, inputs, clock = _measure_setup(variant, processor, example, settings, device, probe, load)
                loaded.append((model, measurement, inputs, clock))
                measurements.append(measurement)
            for round_index in tqdm(range(settings.repeats), desc="timed rounds", unit="round", disable=not progress):
                shift = round_index % len(loaded)
                for model, measurement, inputs, clock in loaded[shift:] + loaded[:shift]:
                    decode(model, inputs, settings.new_tokens, clock)
                    measurement.prefill_ms.append(clock.prefill_ms)
                    measurement.decode_ms.append(clock.decode_ms_per_token)
            del loaded
        else:
            for variant in tqdm(variants, desc="variants", unit="variant", disable=not progress):
                model, measurement, inputs, clock = _measure_setup(variant, processor, example, settings, device, probe, load)
                for _ in range(settings.repeats):
                    decode(model, inputs, settings.new_tokens, clock)
                    measurement.prefill_ms.append(clock.prefill_ms)
                    measurement.decode_ms.append(clock.decode_ms_per_token)
                measurements.append(measurement)
                del model
                _trim_heap()
                if probe.cuda:
                    torch.cuda.empty_cache()
        return measurements
    finally:
        torch.set_num_threads(previous_threads)


def save_measurements(directory: Path, measurements: Sequence[Measurement], meta: dict[str, Any]) -> Path:
    path = Path(directory) / RESULTS
    atomic_write_json(path, {"meta": meta, "measurements": [asdict(m) for m in measurements]})
    return path


def load_measurements(directory: Path) -> tuple[list[Measurement], dict[str, Any]]:
    import json

    path = Path(directory) / RESULTS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 06_benchmark before 07_judge")
    saved = json.loads(path.read_text(encoding="utf-8"))
    return [Measurement(**m) for m in saved["measurements"]], saved["meta"]


def efficiency_table(measurements: Sequence[Measurement], reference: str = "finetuned", bandwidth_gb_s: float = 320.0):
    """One row per variant: absolute figures and ratios to ``reference``; the time split per token;
    and the decode time a GPU with ``bandwidth_gb_s`` could not beat (weight bytes read per token)."""
    import pandas as pd

    rows = []
    for m in measurements:
        decode_ms, prefill_ms = statistics.median(m.decode_ms), statistics.median(m.prefill_ms)
        rows.append({"variant": m.variant, "stage": m.stage, "parameters (M)": round((m.parameters or 0) / 1e6, 1), "bits": m.bits,
                     "layers": m.layers, "model MB": m.model_bytes / 1e6, "decoder MB": m.decoder_bytes / 1e6,
                     "resident MB": m.resident_bytes / 1e6, "of which mapped files MB": m.resident_file_bytes / 1e6,
                     "first generation peak MB": m.first_generation_peak_bytes / 1e6,
                     "peak memory during generation MB": m.generation_peak_bytes / 1e6,
                     "prefill ms": prefill_ms, "decode ms/token": decode_ms,
                     "decode spread ms": max(m.decode_ms) - min(m.decode_ms),
                     "layers ms/token": m.split_ms.get("decoder layers"),
                     "ms per layer": m.split_ms.get("decoder layers", float("nan")) / max(1, m.layers), "lm_head ms/token": m.split_ms.get("lm_head"),
                     "rest ms/token": m.split_ms.get("rest"),
                     "weights read per token MB": m.bytes_per_token / 1e6,
                     "bandwidth bound ms/token": 1000 * m.bytes_per_token / (bandwidth_gb_s * 1e9)})
    table = pd.DataFrame(rows).set_index("variant")
    if reference in table.index:
        for column, ratio in [("model MB", "model MB × finetuned"), ("peak memory during generation MB", "peak memory × finetuned"),
                              ("decode ms/token", "decode × finetuned"), ("prefill ms", "prefill × finetuned")]:
            table[ratio] = table[column] / table.loc[reference, column]
    return table
