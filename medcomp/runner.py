"""Run the numbered notebooks headless with papermill, render HTML, and index the run.

``python -m medcomp run params/embedded.yaml`` executes every ``notebooks/NN_*.ipynb`` in order into
``reports/<run_name>/``. A stage that finished under identical params is reused unless ``--force``;
a failing notebook stops the run (exit code 1), keeps its executed copy with the error, and the
index page shows it. Parameters passed to notebooks are paths only: secrets stay in the environment.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from medcomp.files import atomic_write_json, atomic_write_text
from medcomp.params import REPO_ROOT, Params, load_params, resolve_params_path
from medcomp.runs import REPORTS_DIR, Run, write_manifest

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ok", "reused", "failed", "not run"
    seconds: float
    html: str | None
    error: str | None = None


def discover_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    return sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb"))


def _status_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / stage / "status.json"


def _finished(run_dir: Path, stage: str, fingerprint: str) -> dict[str, Any] | None:
    path = _status_path(run_dir, stage)
    if not path.exists():
        return None
    status = json.loads(path.read_text(encoding="utf-8"))
    return status if status.get("status") == "ok" and status.get("params_fingerprint") == fingerprint else None


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
            cell["outputs"] = merged
    return notebook


def render_html(notebook: Path, target: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(tidy_streams(nbformat.read(str(notebook), as_version=4)))
    atomic_write_text(target, body)
    return target


def execute_stage(notebook: Path, run_dir: Path, params_path: Path) -> StageOutcome:
    import papermill

    stage = notebook.stem
    executed = run_dir / f"{stage}.ipynb"
    started = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters={"params_file": str(params_path), "run_dir": str(run_dir)},
            cwd=str(notebook.parent),
            progress_bar=True,
            kernel_name="python3",
        )
    except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    html_path = None
    if executed.exists():
        html_path = render_html(executed, run_dir / f"{stage}.html").name
    return StageOutcome(stage, "failed" if error else "ok", seconds, html_path, error)


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
    run_dir = Path(run_dir or REPORTS_DIR / params.run_name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(run_dir, params, {"params_file": str(params_path)})
    fingerprint = params.fingerprint()

    outcomes: list[StageOutcome] = []
    failed = False
    for notebook in discover_notebooks(notebooks_dir):
        stage = notebook.stem
        if failed or (only and stage not in only):
            previous = _finished(run_dir, stage, fingerprint)
            outcomes.append(StageOutcome(stage, "reused", previous["seconds"], previous.get("html")) if previous else StageOutcome(stage, "not run", 0.0, None))
            continue
        previous = None if force else _finished(run_dir, stage, fingerprint)
        if previous:
            print(f"[medcomp] {stage}: reusing the finished stage ({previous['seconds']:.0f} s); --force redoes it")
            outcomes.append(StageOutcome(stage, "reused", previous["seconds"], previous.get("html")))
            continue
        print(f"[medcomp] {stage}: running")
        outcome = execute_stage(notebook, run_dir, params_path)
        atomic_write_json(
            _status_path(run_dir, stage),
            {"status": outcome.status, "seconds": round(outcome.seconds, 1), "html": outcome.html,
             "error": outcome.error, "params_fingerprint": fingerprint},
        )
        print(f"[medcomp] {stage}: {outcome.status} in {outcome.seconds:.0f} s")
        outcomes.append(outcome)
        failed = outcome.status == "failed"
    write_index(run_dir, params, outcomes)
    return outcomes


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
        rows.append(
            f'<tr class="{outcome.status.replace(" ", "-")}"><td>{link}</td><td>{outcome.status}</td>'
            f"<td>{outcome.seconds:.0f} s</td><td>{_summary_cell(summary)}{error}</td></tr>"
        )
    world_note = (
        "Embedded world: a small LLaVA (SmolLM2-135M + seeded CLIP tower) on synthetic DermNet-layout images. "
        "These are an honest small model's results, not the paper's."
        if params.world == "embedded"
        else f"Real world: {html.escape(params.model.id)} on {html.escape(params.data.root)}."
    )
    total = sum(o.seconds for o in outcomes if o.status in ("ok", "failed"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>medcomp run {html.escape(params.run_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}}tr.failed{{background:#fdd}}
tr.ok{{background:#efe}}tr.reused{{background:#eef}}pre.error{{white-space:pre-wrap;font-size:12px}}</style></head><body>
<h1>medcomp run <code>{html.escape(params.run_name)}</code></h1>
<p>Reproducing <i>Compression Strategies for Efficient Multimodal LLMs in Medical Contexts</i> (arXiv 2507.21976).</p>
<p><b>{world_note}</b></p>
<p>Executed this time: {total:.0f} s. <a href="manifest.json">manifest.json</a> (params, git commit, packages, hardware),
<a href="registry.json">registry.json</a> (model variants and answers).</p>
<table><tr><th>notebook</th><th>status</th><th>duration</th><th>key figures</th></tr>
{''.join(rows)}</table></body></html>
"""
    target = run_dir / "index.html"
    atomic_write_text(target, page)
    return target
