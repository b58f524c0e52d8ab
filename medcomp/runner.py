"""Run the numbered notebooks headless with papermill, render HTML, and index the run.

``python -m medcomp run params/embedded.yaml`` executes every ``notebooks/NN_*.ipynb`` in order into
``reports/<run_name>/``. A stage is reused only if nothing it depends on changed, as build tools
decide: its params, its notebook's source, the ``medcomp`` package's source, and the executions of
every stage before it (each execution gets a token; a later stage records the tokens it built on).
So redoing a stage, by ``--force``, ``--only`` or a change, redoes every later stage on the next full
run, and the index says why each stage ran or was reused. A failing notebook stops the run (exit
code 1), keeps its executed copy with the error, and the index page shows it. Parameters passed to
notebooks are paths only: secrets stay in the environment.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medcomp.costs import COSTS_LEDGER, LEDGER_ENV, TreePeak, cost_tables_html, peaks_in_child, read_ledger
from medcomp.files import atomic_write_json, atomic_write_text, content_hash
from medcomp.data import DatasetError, check_layout
from medcomp.params import REPO_ROOT, Params, ParamsError, load_params, resolve_params_path
from medcomp.numerics import artefact_hashes, children_in, kernel_fingerprint, numerics_environment, published_reference
from medcomp.results import write_run_results
from medcomp.runs import REPORTS_DIR, RUN_ORDER, Run, write_manifest

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ok", "reused", "failed", "not run", "stale"
    seconds: float
    html: str | None
    error: str | None = None
    reason: str = ""
    peak_gib: float | None = None  # resident memory of the kernel and its children together, at its peak


def discover_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Every ``NN_*.ipynb`` in run order (``RUN_ORDER``)."""
    position = {stage: index for index, stage in enumerate(RUN_ORDER)}
    return sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"), key=lambda p: (position.get(p.stem, len(RUN_ORDER)), p.name))


def notebook_fingerprint(notebook: Path) -> str:
    """Hash of what a notebook computes: its cells' types and sources (not outputs, ids or metadata)."""
    import nbformat

    cells = nbformat.read(str(notebook), as_version=4).cells
    return content_hash([(cell.cell_type, cell.source) for cell in cells], 16)


def package_fingerprint(package_dir: Path = Path(__file__).resolve().parent) -> str:
    """Hash of the ``medcomp`` package's source files."""
    return content_hash({str(p.relative_to(package_dir)): p.read_text(encoding="utf-8") for p in sorted(package_dir.rglob("*.py"))}, 16)


def _status_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / stage / "status.json"


def _read_status(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = _status_path(run_dir, stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


_INPUT_NAMES = {"params": "its params changed", "notebook": "its notebook changed", "package": "the medcomp source changed"}


def why_stale(status: dict[str, Any] | None, inputs: dict[str, Any]) -> str | None:
    """None if a finished stage with ``status`` can be reused under ``inputs``, else the reason it cannot."""
    if status is None:
        return "never ran"
    if status.get("status") != "ok":
        return f"its last run {status.get('status', 'did not finish')}"
    recorded = status.get("inputs", {})
    for key, phrase in _INPUT_NAMES.items():
        if recorded.get(key) != inputs[key]:
            return phrase
    changed = [stage for stage, token in inputs["upstream"].items() if recorded.get("upstream", {}).get(stage) != token]
    if changed or set(recorded.get("upstream", {})) != set(inputs["upstream"]):
        return f"an earlier stage was redone ({', '.join(changed) or 'stages changed'})"
    return None


def _terminal_text(text: str) -> str:
    """What a terminal would show: each line keeps only what follows its last carriage return."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy_streams(notebook) -> Any:
    """Merge each cell's consecutive stdout/stderr outputs and resolve carriage returns.

    Progress bars write one stream output per refresh; without this a report shows hundreds of
    half-drawn bars where a terminal shows the last one.
    """
    for cell in notebook.cells:
        merged: list[Any] = []
        for output in cell.get("outputs", []):
            previous = merged[-1] if merged else None
            if output.get("output_type") == "stream" and previous is not None and previous.get("output_type") == "stream" and previous.get("name") == output.get("name"):
                previous["text"] += output["text"]
            else:
                merged.append(output)
        for output in merged:
            if output.get("output_type") == "stream":
                output["text"] = _terminal_text(output["text"])
        if "outputs" in cell:
            cell["outputs"] = [part for output in merged for part in _progress_apart(output)]
    return notebook


# A tqdm bar as it ends: "training: 100%|██████████| 60/60 [02:31<00:00, 2.52s/step]"
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")


def _progress_apart(output: Any) -> list[Any]:
    """A stderr stream's progress bars as a stdout stream of their own: tqdm writes to stderr, which the
    report's page styles as an error (a red box), and a finished bar is a result, not a warning. Other stderr
    text (a warning) stays stderr."""
    if output.get("output_type") != "stream" or output.get("name") != "stderr":
        return [output]
    if not output["text"].strip():  # the newline a finished bar leaves: nothing to show, and an empty red box if shown
        return []
    lines = output["text"].splitlines(keepends=True)
    bars = "".join(line for line in lines if _PROGRESS_BAR.search(line))
    rest = "".join(line for line in lines if not _PROGRESS_BAR.search(line))
    if not bars:
        return [output]
    from nbformat import from_dict  # outputs stay notebook nodes (attribute access), as nbformat made them

    parts = [from_dict({**output, "name": "stdout", "text": bars})]
    return parts + ([from_dict({**output, "text": rest})] if rest.strip() else [])


TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def render_html(notebook: Path, target: Path) -> Path:
    """HTML with code cells folded (expandable) and progress bars shown as a terminal shows them."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", extra_template_paths=[str(TEMPLATES_DIR)], template_file="folded.html.j2",
                            exclude_input_prompt=True, exclude_output_prompt=True)  # a report reads as narrative: no In[]/Out[] prompts
    body, _ = exporter.from_notebook_node(tidy_streams(nbformat.read(str(notebook), as_version=4)))
    atomic_write_text(target, body)
    return target


def _section_announcer(notebook: Path, stage: str):
    """An nbclient ``on_cell_start`` hook that prints, in the terminal, the section a cell belongs to.

    papermill's own bar only counts cells; a stage can sit on one cell for minutes. With this and the
    kernel's stderr (progress bars) mirrored to the terminal, a user sees which step is running.
    """
    import nbformat

    section_of: dict[str, str] = {}
    current = "setup"
    for cell in nbformat.read(str(notebook), as_version=4).cells:
        if cell.cell_type == "markdown":
            heading = next((line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")), None)
            current = heading or current
        elif "id" in cell:
            section_of[cell.id] = current
    announced: list[str] = []

    def announce(cell, cell_index, **_):
        section = section_of.get(cell.get("id", ""))
        if section and (not announced or announced[-1] != section):
            announced.append(section)
            print(f"[medcomp] {stage} · {section}", file=sys.stderr, flush=True)

    return announce


def ipc_kernel_manager() -> type:
    """A kernel manager whose kernel talks over Unix sockets in a private temp folder instead of TCP on localhost:
    with TCP every kernel prints "Kernel is running over TCP without encryption" at its start, which a newcomer
    reads as a problem, and the ports are open to every local user. Nothing leaves the machine either way."""
    import shutil
    import tempfile

    from jupyter_client import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = str(Path(tempfile.mkdtemp(prefix="medcomp-kernel-")) / "kernel")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:  # shutdown awaits this one
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(Path(self.ip).parent, ignore_errors=True)

    return IPCKernelManager


def execute_stage(notebook: Path, run_dir: Path, params_path: Path) -> StageOutcome:
    import papermill

    stage = notebook.stem
    executed = run_dir / f"{stage}.ipynb"
    incomplete = run_dir / "stages" / stage / "incomplete.json"
    incomplete.unlink(missing_ok=True)  # only this execution may declare itself unfinished
    ledger = run_dir / "stages" / stage / COSTS_LEDGER
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.unlink(missing_ok=True)  # the cost table is this execution's
    previous_ledger = os.environ.get(LEDGER_ENV)
    os.environ[LEDGER_ENV] = str(ledger)  # the kernel and its children inherit it (medcomp.costs)
    started = time.perf_counter()
    error = None
    with TreePeak() as memory:  # the kernel's and its children's resident memory, sampled
        try:
            papermill.execute_notebook(
                str(notebook),
                str(executed),
                parameters={"params_file": str(params_path), "run_dir": str(run_dir)},
                cwd=str(notebook.parent),
                progress_bar=False,
                stderr_file=sys.stderr,  # the kernel's progress bars, live in the terminal
                on_cell_start=_section_announcer(notebook, stage),
                kernel_name="python3",
                kernel_manager_class=ipc_kernel_manager(),
            )
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if previous_ledger is None:
                os.environ.pop(LEDGER_ENV, None)
            else:
                os.environ[LEDGER_ENV] = previous_ledger
    seconds = time.perf_counter() - started
    html_path = None
    if executed.exists():
        html_path = render_html(executed, run_dir / f"{stage}.html").name
    if error is None and incomplete.exists():
        return StageOutcome(stage, "incomplete", seconds, html_path, json.loads(incomplete.read_text())["reason"], peak_gib=memory.gib)
    return StageOutcome(stage, "failed" if error else "ok", seconds, html_path, error, peak_gib=memory.gib)


def run_pipeline(
    params_file: str | Path,
    force: bool = False,
    only: Sequence[str] | None = None,
    run_dir: str | Path | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
) -> list[StageOutcome]:
    """Execute the notebooks for ``params_file``; returns one outcome per notebook."""
    params = load_params(params_file)  # fails before any work on a bad file
    params_path = resolve_params_path(params_file).resolve()
    try:
        check_layout(params)  # a missing dataset fails now, not after the model's download
    except DatasetError as error:
        raise ParamsError(f"{params_path}: {error}") from None
    run_dir = Path(run_dir or REPORTS_DIR / params.run_name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # read by torch in every kernel and child this run starts (a sweep's next point may ask for other numerics);
    # the caller's environment is given back afterwards
    mode = params.runtime.numerics_mode()
    with children_in(mode):
        numerics = {"mode": mode, "asked": params.runtime.numerics, **kernel_fingerprint(mode)}
        numerics["comparable with"] = published_reference(numerics.get("probe hash"))
        # this machine's GEMM ceiling per dtype, at the kernels' threads and numerics: what the cost table compares with
        peaks = peaks_in_child(params.runtime.threads, numerics_environment(mode))
        write_manifest(run_dir, params, {"params_file": str(params_path), "numerics": numerics, "peaks": peaks})
        shared = {"params": params.fingerprint(), "package": package_fingerprint()}

        write_index(run_dir, params, [])  # the forecast shows before any stage runs
        outcomes: list[StageOutcome] = []
        upstream: dict[str, str | None] = {}  # execution token of every earlier stage
        failed = False
        for notebook in discover_notebooks(notebooks_dir):
            stage = notebook.stem
            inputs = {**shared, "notebook": notebook_fingerprint(notebook), "upstream": dict(upstream)}
            previous = _read_status(run_dir, stage)
            stale = why_stale(previous, inputs)
            if failed or (only and stage not in only):
                if previous is None:
                    outcomes.append(StageOutcome(stage, "not run", 0.0, None, reason="an earlier stage failed" if failed else "not selected by --only"))
                else:
                    outcomes.append(StageOutcome(stage, "stale" if stale else "reused", previous["seconds"], previous.get("html"), peak_gib=previous.get("peak GiB"),
                                                 reason=f"not run now; {stale}" if stale else "not run now; up to date"))
                upstream[stage] = previous.get("token") if previous else None
                continue
            if not force and not only and stale is None:
                print(f"[medcomp] {stage}: reusing the finished stage ({previous['seconds']:.0f} s): nothing it depends on changed; --force redoes it")
                outcomes.append(StageOutcome(stage, "reused", previous["seconds"], previous.get("html"), reason="nothing it depends on changed",
                                             peak_gib=previous.get("peak GiB")))
                upstream[stage] = previous["token"]
                continue
            reason = "--force" if force else "redone by --only" if only else stale
            print(f"[medcomp] {stage}: running ({reason})")
            outcome = execute_stage(notebook, run_dir, params_path)
            outcome.reason = reason
            token = uuid.uuid4().hex[:16]
            atomic_write_json(
                _status_path(run_dir, stage),
                {"status": outcome.status, "seconds": round(outcome.seconds, 1), "peak GiB": outcome.peak_gib, "html": outcome.html,
                 "error": outcome.error, "reason": reason, "token": token, "inputs": inputs},
            )
            print(f"[medcomp] {stage}: {outcome.status} in {outcome.seconds:.0f} s")
            outcomes.append(outcome)
            upstream[stage] = token
            failed = outcome.status in ("failed", "incomplete")  # later stages would build on missing results
        manifest_path = run_dir / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        atomic_write_json(manifest_path, {**manifest, "artefacts": artefact_hashes(run_dir)})  # what each stage computed, as bits
        write_index(run_dir, params, outcomes)
        write_run_results(run_dir)  # results.json: the machine-readable record (medcomp.results)
        return outcomes


def numerics_html(run_dir: Path) -> str:
    """The manifest's numerics fingerprint and artefact hashes: where two runs part, at a glance."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return ""
    manifest = json.loads(path.read_text())
    numerics, artefacts = manifest.get("numerics", {}), manifest.get("artefacts", {})
    shown = {key: numerics.get(key) for key in ("mode", "asked", "comparable with", "cpu", "vendor", "instruction sets", "aten capability", "torch threads", "torch", "mkl", "onednn",
                                                "pins", "probe loss", "probe hash") if key in numerics}
    shown |= {f"kernels: {family}": digest for family, digest in numerics.get("kernel hashes", {}).items()}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in shown.items())
    rows += "".join(f"<tr><th>{html.escape(stage)} artefact sha256</th><td><code>{html.escape(digest)}</code></td></tr>" for stage, digest in artefacts.items())
    return (f"<h2>Numerics</h2><p>Two runs that print the same probe hash computed the same bits on the same inputs; the first artefact "
            f"hash that differs is the stage where they part, and a kernel hash that differs names the kernel family "
            f"(<code>python -m medcomp numerics</code> compares this CPU with emulated ones).</p><table>{rows}</table>") if rows else ""


def costs_html(run_dir: Path, outcomes: Sequence[StageOutcome]) -> str:
    """Each executed stage's cost table (``medcomp.costs``) against the GEMM peaks this run measured."""
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    shown = ("ok", "failed", "incomplete", "reused", "stale")
    stages = [(o.stage, o.seconds, o.peak_gib, read_ledger(run_dir / "stages" / o.stage / COSTS_LEDGER)) for o in outcomes if o.status in shown]
    return cost_tables_html(stages, manifest.get("peaks") or {})


def _summary_cell(summary: dict[str, Any]) -> str:
    return "<br>".join(f"{html.escape(str(k))}: <b>{html.escape(str(v))}</b>" for k, v in summary.items())


def write_index(run_dir: Path, params: Params, outcomes: Sequence[StageOutcome]) -> Path:
    """``index.html``: each notebook's status, duration, key figures and a link to its report."""
    run = Run(run_dir)
    rows = []
    for outcome in outcomes:
        summary = run.summary(outcome.stage)
        link = f'<a href="{html.escape(outcome.html)}">{html.escape(outcome.stage)}</a>' if outcome.html else html.escape(outcome.stage)
        error = f'<pre class="error">{html.escape(outcome.error[-2000:])}</pre>' if outcome.error else ""
        # a stage that ran says why it ran ("ok, never ran" read as a contradiction); the others say why not
        reason = f"why it ran: {outcome.reason}" if outcome.status in ("ok", "failed") and outcome.reason else outcome.reason
        rows.append(
            f'<tr class="{outcome.status.replace(" ", "-")}"><td>{link}</td><td>{outcome.status}<br><small>{html.escape(reason)}</small></td>'
            f"<td>{outcome.seconds:.0f} s</td><td>{'—' if outcome.peak_gib is None else f'{outcome.peak_gib:.1f} GiB'}</td>"
            f"<td>{_summary_cell(summary)}{error}</td></tr>"
        )
    world_note = (
        "Embedded world: a small LLaVA (SmolLM2-135M + seeded CLIP tower) on synthetic DermNet-layout images. "
        "These are an honest small model's results, not the paper's."
        if params.world == "embedded"
        else f"Real world: {html.escape(params.model.id)} on {html.escape(params.data.root)}."
    )
    total = sum(o.seconds for o in outcomes if o.status in ("ok", "failed"))
    headlines = "".join(run.headline(o.stage) for o in outcomes if o.status in ("ok", "reused", "stale"))
    from medcomp.forecast import forecast_html

    forecast = forecast_html(params)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>medcomp run {html.escape(params.run_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}}tr.failed{{background:#fdd}}
tr.ok{{background:#efe}}tr.incomplete{{background:#fed}}tr.reused{{background:#eef}}tr.stale{{background:#ffd}}pre.error{{white-space:pre-wrap;font-size:12px}}
.headline table{{width:auto;font-size:13px}}.headline td,.headline th{{padding:3px 6px}}</style></head><body>
<h1>medcomp run <code>{html.escape(params.run_name)}</code></h1>
<p>Reproducing <i>Compression Strategies for Efficient Multimodal LLMs in Medical Contexts</i> (arXiv 2507.21976).</p>
<p><b>{world_note}</b></p>
<p>Executed this time: {total:.0f} s. <a href="manifest.json">manifest.json</a> (params, git commit, packages, hardware),
<a href="registry.json">registry.json</a> (model variants and answers).</p>
{headlines}
{forecast}
<h2>Notebooks</h2>
<table><tr><th>notebook</th><th>status</th><th>duration</th><th>peak memory</th><th>key figures</th></tr>
{''.join(rows)}</table>{costs_html(run_dir, outcomes)}{numerics_html(run_dir)}</body></html>
"""
    target = run_dir / "index.html"
    atomic_write_text(target, page)
    return target
