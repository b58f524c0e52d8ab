"""Cost accounting: what each long operation of a stage cost, against the peak this machine measured.

A run starts by measuring this machine's GEMM peak in each dtype at the run's thread count (``measure_peaks``,
about a second, in a child process computing in the run's numerics mode). While a stage's notebook runs, every
operation that matters (a training, an answer pass, a search, a ranking, a timing loop) goes through
``operation``, which times it and appends one line to the stage's ledger: the file named by ``MEDCOMP_COSTS``,
which the runner sets for each notebook it executes (child processes inherit it: GPTQModel's searches record
themselves). ``cost_table`` turns a ledger into the table the run's index shows and ``results.json`` keeps:
seconds, share of the stage, work (FLOPs counted from the model config and the token counts), achieved GFLOP/s
and that as a share of the peak for the operation's dtype.

The FLOP counts are the matrix products of the language model (``forward_flops``): ``2 · parameters`` per token
of its linears, plus attention's ``4 · layers · heads · head_dim · context``. The vision tower, norms and
activations are left out (about 1 % on the embedded model). Training on a frozen base computes the forward and
the gradient with respect to activations: twice the forward's work (``training_flops``).

Why written here: profilers (torch.profiler, py-spy) say where a process spends time, not how far each step is
from what the CPU can do, nor which stage of a run paid for it; this is the few lines that say both.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

LEDGER_ENV = "MEDCOMP_COSTS"
COSTS_LEDGER = "costs.jsonl"  # in each stage's folder
OPEN_ENV = "MEDCOMP_COSTS_OPEN"  # set while an operation runs: a child process's operations are inside it
# an operation shorter than this is summed into one line: the table is for what a user waits on
SHOWN_SECONDS = 5.0
# the embedded model's shapes (SmolLM2-135M): a batch of prompt tokens times hidden by MLP width
GEMM_SHAPE = (512, 576, 1536)
PEAK_DTYPES = ("float32", "bfloat16", "float16")
COST_COLUMNS = ("operation", "kind", "seconds", "% of stage", "work (GFLOP)", "tokens", "dtype", "GFLOP/s", "% of peak")


@dataclass
class Work:
    """What an operation computed; the code inside ``operation`` fills it in once it knows."""
    flops: float | None = None
    tokens: int | None = None
    dtype: str = "float32"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def ledger_path() -> Path | None:
    value = os.environ.get(LEDGER_ENV)
    return Path(value) if value else None


def record(name: str, kind: str, seconds: float, work: Work) -> None:
    """Append one operation to the stage's ledger (no ledger set: nothing). One ``write`` of one line to a file
    opened for appending: lines of concurrent writers (a child process) do not interleave."""
    path = ledger_path()
    if path is None:
        return
    entry = {"name": name, "kind": kind, "seconds": round(seconds, 3), **{k: v for k, v in asdict(work).items() if k != "extra"}, **work.extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


_OPEN: list[Work] = []  # the operations running in this process, outermost first


@contextlib.contextmanager
def operation(name: str, kind: str, dtype: str = "float32") -> Iterator[Work]:
    """Time the block and record it as one operation of the running stage: ``with operation("answers (finetuned)",
    "answer pass") as work: ...; work.flops = ...``. Recorded also when the block raises (what it cost is spent).

    Operations nest (a ranking's answer passes): an inner one is recorded as ``nested`` and left out of the table,
    and its work is added to the outer one's where the outer one counts none of its own."""
    work = Work(dtype=dtype)
    outer = _OPEN[-1] if _OPEN else None
    inside_parent = bool(os.environ.get(OPEN_ENV))  # a child process started inside an operation (a GPTQModel search)
    _OPEN.append(work)
    if outer is None:
        os.environ[OPEN_ENV] = "1"  # what this operation starts counts inside it
    started = time.perf_counter()
    try:
        yield work
    finally:
        _OPEN.pop()
        if outer is None and not inside_parent:
            os.environ.pop(OPEN_ENV, None)
        inner = work.extra.pop("_inner", None)
        if inner is not None and work.flops is None:
            work.flops, work.tokens = inner["flops"] or None, work.tokens if work.tokens is not None else inner["tokens"] or None
        if inside_parent:
            work.extra["nested"] = True
        if outer is not None:
            work.extra["nested"] = True
            totals = outer.extra.setdefault("_inner", {"flops": 0.0, "tokens": 0})
            totals["flops"] += work.flops or 0.0
            totals["tokens"] += work.tokens or 0
        record(name, kind, time.perf_counter() - started, work)


def model_dtype(model) -> str:
    """The dtype its decoder's weights are stored in: ``int4`` (AWQ, RTN, GPTQ, medcomp.int4), ``nf4`` (bitsandbytes),
    else that of the first floating-point parameter."""
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Params4bit"):
            return "nf4"
        if hasattr(module, "qweight"):
            return "int4"
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype).removeprefix("torch.")
    return "float32"


def _text_config(config):
    return getattr(config, "text_config", None) or config


def linear_parameters(config) -> int:
    """Weights of the language model's decoder linears (q, k, v, o, gate, up, down), from its config."""
    text = _text_config(config)
    hidden, heads = text.hidden_size, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return text.num_hidden_layers * (attention + 3 * hidden * text.intermediate_size)


def forward_flops(config, tokens: int, context: float = 0.0, logits: int | None = None) -> float:
    """FLOPs of the language model's matrix products over ``tokens`` positions that attend to ``context`` positions
    on average, and ``logits`` positions through the output head (default: every position)."""
    text = _text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 4 * text.num_hidden_layers * text.num_attention_heads * head_dim * context
    head = 2 * text.hidden_size * text.vocab_size * (tokens if logits is None else logits)
    return float(tokens * (2 * linear_parameters(config) + attention) + head)


def training_flops(config, tokens: int, context: float = 0.0) -> float:
    """A step's work on a frozen base (LoRA, QLoRA): the forward, and the backward through activations (as much
    again); the adapters' own gradients are a few percent and left out."""
    return 2 * forward_flops(config, tokens, context)


def measure_peaks(threads: int, shape: tuple[int, int, int] = GEMM_SHAPE, seconds: float = 0.3, dtypes=PEAK_DTYPES,
                  device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of ``torch.matmul`` at ``shape`` (m, k, n) in each dtype, best of repeated timings for about
    ``seconds`` each, at ``threads`` threads: the ceiling the cost table compares each operation with."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    m, k, n = shape
    peaks = {}
    try:
        for dtype in dtypes:
            a = torch.randn(m, k, device=device).to(getattr(torch, dtype))
            b = torch.randn(k, n, device=device).to(getattr(torch, dtype))
            torch.matmul(a, b)  # first call: kernel selection, packing
            best, spent, calls = float("inf"), 0.0, 0
            while spent < seconds or calls < 3:
                started = time.perf_counter()
                torch.matmul(a, b)
                if device != "cpu":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
            peaks[dtype] = round(2 * m * k * n / best / 1e9, 1)
    finally:
        torch.set_num_threads(previous)
    return peaks


def peaks_in_child(threads: int, environment: dict[str, str] | None = None) -> dict[str, Any]:
    """``measure_peaks`` in a fresh process with ``environment`` (the run's numerics pins take effect only in a
    process that starts with them). Returns ``{"threads", "shape", "GFLOP/s": {dtype: value}}``, or the error."""
    command = [sys.executable, "-m", "medcomp.costs", str(threads)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        return {"threads": threads, "shape": list(GEMM_SHAPE), "error": f"{type(error).__name__}: {error}"}
    return {"threads": threads, "shape": list(GEMM_SHAPE), "GFLOP/s": peaks}


class TreePeak:
    """Peak resident memory of this process and all its descendants together (a notebook's kernel, GPTQModel's
    children), sampled every ``interval`` seconds while the block runs: ``with TreePeak() as peak: ...; peak.gib``."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.gib = 0.0

    def _total(self) -> int:
        import psutil

        total = 0
        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # ended between the listing and the reading
                pass
        return total

    def __enter__(self) -> "TreePeak":
        import threading

        import psutil

        self._root = psutil.Process()
        self._peak = self._total()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._total())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.gib = round(self._peak / 2**30, 2)


def read_ledger(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def cost_rows(entries: list[dict[str, Any]], stage_seconds: float | None, peaks: dict[str, float] | None) -> list[dict[str, Any]]:
    """The stage's cost table as rows, longest first: each operation of at least ``SHOWN_SECONDS``, the shorter
    ones summed in one row, and what no operation accounts for (kernel start, imports, loading, saving, figures).
    Achieved GFLOP/s is set where the work is counted; ``% of peak`` where the dtype has a measured peak (int4
    and nf4 compute in another dtype after unpacking: no GEMM peak of their own)."""
    peaks = peaks or {}
    entries = [e for e in entries if not e.get("nested")]  # inside an outer operation, which carries their time and work
    shown = sorted((e for e in entries if e["seconds"] >= SHOWN_SECONDS), key=lambda e: -e["seconds"])
    short = [e for e in entries if e["seconds"] < SHOWN_SECONDS]
    rows = []
    for entry in shown:
        gflops = entry["flops"] / entry["seconds"] / 1e9 if entry.get("flops") else None
        peak = peaks.get(entry.get("dtype", ""))
        rows.append({"operation": entry["name"], "kind": entry["kind"], "seconds": round(entry["seconds"], 1),
                     "work (GFLOP)": round(entry["flops"] / 1e9, 1) if entry.get("flops") else None, "tokens": entry.get("tokens"),
                     "dtype": entry.get("dtype"), "GFLOP/s": round(gflops, 1) if gflops else None,
                     "% of peak": round(100 * gflops / peak, 1) if gflops and peak else None})
    if short:
        rows.append({"operation": f"{len(short)} shorter operations (< {SHOWN_SECONDS:.0f} s each)", "kind": "",
                     "seconds": round(sum(e["seconds"] for e in short), 1)})
    if stage_seconds is not None:
        accounted = sum(e["seconds"] for e in entries)
        rows.append({"operation": "the rest: kernel start, imports, loading and saving models, tables, figures", "kind": "",
                     "seconds": round(max(stage_seconds - accounted, 0.0), 1)})
    for row in rows:
        row["% of stage"] = round(100 * row["seconds"] / stage_seconds, 1) if stage_seconds else None
    return rows


def cost_tables_html(stages: list[tuple[str, float, float | None, list[dict[str, Any]]]], peaks: dict[str, Any]) -> str:
    """The run index's "Where the time went": per stage (name, seconds, peak GiB, ledger entries) its ``cost_rows``."""
    import html

    gflops = peaks.get("GFLOP/s") or {}
    sections = []
    for stage, seconds, peak_gib, entries in stages:
        rows = cost_rows(entries, seconds, gflops)
        if len(rows) <= 1:  # no ledger: only "the rest"
            continue
        body = "".join("<tr>" + "".join(f"<td>{'—' if row.get(c) is None else html.escape(str(row[c]))}</td>" for c in COST_COLUMNS) + "</tr>"
                       for row in rows)
        peak = f", peak memory {peak_gib} GiB" if peak_gib is not None else ""
        sections.append(f'<h3>{html.escape(stage)}: {seconds:.0f} s{peak}</h3><table class="costs"><tr>'
                        + "".join(f"<th>{html.escape(c)}</th>" for c in COST_COLUMNS) + f"</tr>{body}</table>")
    if not sections:
        return ""
    measured = ", ".join(f"{dtype} <b>{value}</b>" for dtype, value in gflops.items()) or html.escape(str(peaks.get("error", "not measured")))
    return (f"<h2>Where the time went</h2><p>This machine's GEMM peak, measured at the start of this run (<code>torch.matmul</code> "
            f"{'×'.join(map(str, peaks.get('shape', [])))} at {peaks.get('threads', '?')} threads), in GFLOP/s: {measured}. Each operation of "
            f"{SHOWN_SECONDS:.0f} s or more is listed with its work (the language model's matrix products, counted from its config and "
            f"the token counts) and the share of the peak for its dtype it reached; int4 and nf4 unpack into another dtype, so they have "
            f"no peak of their own. The project's <code>docs/performance.md</code> says how to read it.</p>" + "".join(sections))


if __name__ == "__main__":  # python -m medcomp.costs THREADS: the peaks as one JSON line (peaks_in_child)
    print(json.dumps(measure_peaks(int(sys.argv[1]))))
