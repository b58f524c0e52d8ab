"""The machine-readable results of a run or a sweep, and the docs rendered from the committed ones.

Every ``medcomp run`` writes ``results.json`` into its run folder, and every ``medcomp sweep`` into its
sweep folder: date, commit, package versions, hardware, the numerics fingerprint, each stage's time, the
key figures, every variant's score, the paper's Table 4 rows and the verdicts (over the points, for a
sweep). A measured run worth keeping is copied into ``results/`` (append-only: one file per measured run,
never edited). ``python -m medcomp docs`` renders the README's headline table and ``docs/results.md``
from ``results/`` and ``docs/params.md`` from the params schema; ``--check`` fails when a committed page
differs from what it renders, and a test runs it, so a number in the docs cannot go stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from medcomp.costs import COSTS_LEDGER, cost_rows, read_ledger
from medcomp.files import atomic_write_json, atomic_write_text
from medcomp.goals import goal_verdicts, goals_table, time_budget_table, time_budget_verdicts
from medcomp.paper import TABLE_4
from medcomp.params import REPO_ROOT, Params
from medcomp.runs import Run

RESULTS_DIR = REPO_ROOT / "results"
SCHEMA = 1
VERDICTS = ("holds", "does not hold", "within noise")
HEADLINE = ("<!-- results:headline: rendered by `python -m medcomp docs` from results/*.json; do not edit by hand -->",
            "<!-- /results:headline -->")


def judge_table(run_dir: Path, name: str) -> pd.DataFrame | None:
    """One of 07's tables of a run, or None where 07 has not written it."""
    path = run_dir / "stages" / "07_judge" / "tables" / f"{name}.csv"
    return pd.read_csv(path, index_col=0) if path.exists() else None


def run_results(run_dir: Path | str) -> dict[str, Any]:
    """What a finished (or partly finished) run computed, from its manifest, summaries and 07's tables."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    run = Run(run_dir)
    stages = sorted(p.name for p in (run_dir / "stages").glob("0*")) if (run_dir / "stages").exists() else []
    summaries = {stage: run.summary(stage) for stage in stages}
    statuses = {stage: json.loads(path.read_text()) for stage in stages if (path := run_dir / "stages" / stage / "status.json").exists()}
    scores, verdicts, table_4 = judge_table(run_dir, "scores"), judge_table(run_dir, "verdicts"), judge_table(run_dir, "table_4")
    return {"schema": SCHEMA, "kind": "run", "date": manifest.get("written_at"), "git": manifest.get("git"), "packages": manifest.get("packages"),
            "hardware": manifest.get("hardware"), "numerics": manifest.get("numerics"), "params_fingerprint": manifest.get("params_fingerprint"),
            "run_name": (manifest.get("params") or {}).get("run_name"), "world": (manifest.get("params") or {}).get("world"),
            "seed": (manifest.get("params") or {}).get("seed"),
            "stage status": {stage: status.get("status") for stage, status in statuses.items()},
            "stage seconds": {stage: status.get("seconds") for stage, status in statuses.items()},
            "key figures": summaries,
            "scores": {} if scores is None else {variant: float(row["score"]) for variant, row in scores.iterrows()},
            "table 4": {} if table_4 is None else {method: row["variant"] for method, row in table_4.iterrows()},
            "verdicts": {} if verdicts is None else {claim: {"verdict": row["verdict"], "difference": row["difference [95% CI]"]}
                                                   for claim, row in verdicts.iterrows()},
            "efficiency": efficiency(run_dir), "training seconds": training_seconds(run_dir),
            "stage peak GiB": {stage: status.get("peak GiB") for stage, status in statuses.items()},
            "peaks": manifest.get("peaks"), "costs": stage_costs(run_dir, statuses, (manifest.get("peaks") or {}).get("GFLOP/s"))}


def stage_costs(run_dir: Path, statuses: dict[str, dict[str, Any]], peaks: dict[str, float] | None) -> dict[str, list[dict[str, Any]]]:
    """Each stage's cost table (``medcomp.costs.cost_rows``) from its ledger, for the stages that kept one."""
    tables = {}
    for stage, status in statuses.items():
        ledger = run_dir / "stages" / stage / COSTS_LEDGER
        if ledger.exists():
            tables[stage] = cost_rows(read_ledger(ledger), status.get("seconds"), peaks)
    return tables


def efficiency(run_dir: Path) -> dict[str, dict[str, float]]:
    """06's measurement of each variant: its tensors' bytes and its median decode time per token."""
    import statistics

    path = run_dir / "stages" / "06_benchmark" / "benchmark.json"
    measured = json.loads(path.read_text())["measurements"] if path.exists() else []
    return {m["variant"]: {"model bytes": m["model_bytes"], "decode ms/token": statistics.median(m["decode_ms"])} for m in measured if m["decode_ms"]}


def training_seconds(run_dir: Path) -> dict[str, float]:
    """Each recovery's training time (04's, and 08's distilled, SLEB and block-replacement recoveries)."""
    stages = run_dir / "stages"
    seconds = {path.parent.name: json.loads(path.read_text())["result"]["SFT seconds"] for path in sorted(stages.glob("*/*/recovery.json"))}
    for path in sorted(stages.glob("08_beyond/streamline-*.json")):  # the replacement block's training, before its recovery
        record = json.loads(path.read_text())
        seconds[f"pruned-{record['span'][1] - record['span'][0] - 1}-streamline"] = record["seconds"]
    return seconds


def write_run_results(run_dir: Path | str) -> Path:
    target = Path(run_dir) / "results.json"
    atomic_write_json(target, run_results(run_dir))
    return target


def score_spread(scores: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per variant: its score at every point, their mean, sample standard deviation and range."""
    frame = pd.DataFrame(scores)
    spread = {}
    for variant, row in frame.iterrows():
        values = row.dropna()
        spread[str(variant)] = {"points": {k: round(float(v), 2) for k, v in values.items()}, "mean": round(float(values.mean()), 2),
                                "sd": round(float(values.std(ddof=1)), 2) if len(values) > 1 else 0.0,
                                "range": round(float(values.max() - values.min()), 2)}
    return spread


def _interval(text: str) -> tuple[float, float, float]:
    """"+3.1 [-1.0, +7.2]" -> (3.1, -1.0, 7.2)."""
    numbers = [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", text)]
    return numbers[0], numbers[1], numbers[2]


def verdicts_over_points(verdicts: dict[str, dict[str, dict[str, str]]]) -> dict[str, dict[str, Any]]:
    """Per claim: on how many points it holds / does not hold / is within noise; the mean difference; the union of
    the points' intervals; and the verdict over all points: one verdict only where every point agrees, else *mixed*."""
    claims = list(dict.fromkeys(claim for table in verdicts.values() for claim in table))
    over = {}
    for claim in claims:
        per_point = [table[claim] for table in verdicts.values() if claim in table]
        counts = {verdict: sum(r["verdict"] == verdict for r in per_point) for verdict in VERDICTS}
        intervals = [_interval(r["difference"]) for r in per_point]
        agreed = [verdict for verdict, count in counts.items() if count == len(per_point)]
        over[claim] = {"points": len(per_point), **{f"{v} on": counts[v] for v in VERDICTS},
                       "mean difference": round(sum(d for d, _, _ in intervals) / len(intervals), 1),
                       "interval over points": f"[{min(low for _, low, _ in intervals):+.1f}, {max(high for _, _, high in intervals):+.1f}]",
                       "verdict over points": agreed[0] if agreed else "mixed"}
    return over


def sweep_results(sweep_dir: Path | str, points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sweep's points' results, the score spread over them and the verdicts over them."""
    sweep_dir = Path(sweep_dir)
    per_point = {name: run_results(sweep_dir / name) for name in points}
    first = next(iter(per_point.values()), {})
    return {"schema": SCHEMA, "kind": "sweep", "date": first.get("date"), "git": first.get("git"), "packages": first.get("packages"),
            "hardware": first.get("hardware"), "numerics": first.get("numerics"), "world": first.get("world"),
            "points": {name: {"setting": points[name], **result} for name, result in per_point.items()}, "point count": len(per_point),
            "table 4": first.get("table 4", {}),
            "score spread": score_spread({name: r["scores"] for name, r in per_point.items() if r["scores"]}),
            "verdicts over points": verdicts_over_points({name: r["verdicts"] for name, r in per_point.items() if r["verdicts"]})}


def write_sweep_results(sweep_dir: Path | str, points: dict[str, dict[str, Any]]) -> Path:
    target = Path(sweep_dir) / "results.json"
    atomic_write_json(target, sweep_results(sweep_dir, points))
    return target


def committed(directory: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """The committed results files, oldest first (their names start with the date)."""
    return [{**json.loads(path.read_text()), "file": path.name} for path in sorted(Path(directory).glob("*.json"))]


def newest_sweep(world: str, directory: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The newest committed sweep of ``world`` (``results/``), or None."""
    sweeps = [r for r in committed(directory) if r.get("kind") == "sweep" and r.get("world") == world]
    return sweeps[-1] if sweeps else None


def recorded_verdicts(world: str, contains: str, directory: Path = RESULTS_DIR) -> tuple[pd.DataFrame, str] | None:
    """The claims of the newest committed sweep of ``world`` whose text contains ``contains``, over its points, and where
    they come from (file, date, commits): what a preset that leaves a settled recipe out shows in its place. None
    without such a sweep."""
    record = newest_sweep(world, directory)
    if record is None:
        return None
    claims = {claim: row for claim, row in (record.get("verdicts over points") or {}).items() if contains in claim}
    return pd.DataFrame(claims).T, f"results/{record['file']} ({label(record)}; {record['point count']} seeds)"


def label(result: dict[str, Any]) -> str:
    """The record's date and commit; a sweep whose points ran at other commits than its first names each of them."""
    commits = [(result.get("git") or {}).get("commit") or "?"]
    for point in (result.get("points") or {}).values():
        commit = (point.get("git") or {}).get("commit")
        if commit and commit not in commits:
            commits.append(commit)
    return f"{str(result.get('date') or '?')[:10]}, " + ", ".join(f"`{c[:7]}`" for c in commits)


def headline_table(results: list[dict[str, Any]]) -> str:
    """The paper's Table 4 beside the embedded sweep with the most points (the newest of those): each row's score,
    mean ± sd over its points. A shorter newer sweep does not displace a longer one from the headline."""
    sweeps = [r for r in results if r.get("kind") == "sweep" and r.get("world") == "embedded"]
    if not sweeps:
        return "No embedded sweep has been committed under `results/` yet."
    sweep = max(reversed(sweeps), key=lambda r: r.get("point count") or len(r.get("points") or {}))
    spread, rows = sweep["score spread"], sweep.get("table 4", {})
    points = sweep.get("point count") or len(sweep.get("points") or {}) or "?"
    finetuned = spread.get(rows.get("Original LLaVA", "finetuned"), {}).get("mean")
    lines = [f"| the paper's Table 4 | paper: score | paper: × original | embedded: proxy score over {points} seeds, mean ± sd | embedded: × finetuned |",
             "|---|---|---|---|---|"]
    for method, paper in TABLE_4["score"].items():
        variant = rows.get(method)
        ours = spread.get(variant or "", {})
        share = f"{ours['mean'] / finetuned:.2f}×" if ours and finetuned else "—"
        cell = f"{ours['mean']:.1f} ± {ours['sd']:.1f} (`{variant}`)" if ours else "not in this record"
        lines.append(f"| {method} | {paper:.2f} | {paper / TABLE_4['score'].iloc[0]:.2f}× | {cell} | {share} |")
    how = "transcribed from measurements made before results files existed" if sweep.get("source") else "machine-written by `medcomp sweep`"
    source = f"from `results/{sweep['file']}` ({label(sweep)}; {how})"
    return "\n".join(lines) + f"\n\nEmbedded: a 135M-parameter LLaVA on synthetic DermNet-layout images, proxy-judged; {source}."


def results_page(results: list[dict[str, Any]]) -> str:
    """``docs/results.md``: every committed result, newest first, with its verdicts."""
    parts = ["# Results\n", "Rendered by `python -m medcomp docs` from the files under `results/` (one per measured run, never edited); "
             "do not edit this page by hand. The paper's own numbers are in `medcomp/paper.py`.\n", "## Headline\n", headline_table(results), ""]
    for result in reversed(results):
        parts.append(f"## `{result['file']}`: {result.get('kind')}, {result.get('world')}, {label(result)}\n")
        if result.get("source"):
            parts.append(f"Source: {result['source']}\n")
        cpu = (result.get("numerics") or {}).get("cpu") or (result.get("hardware") or {}).get("cpu")
        if cpu:
            parts.append(f"Machine: {cpu}; numerics {(result.get('numerics') or {}).get('mode', '?')}.\n")
        spread = result.get("score spread") or {}
        if spread:
            parts += ["| variant | mean | sd | range | per point |", "|---|---|---|---|---|"]
            parts += [f"| `{v}` | {s['mean']:.1f} | {s['sd']:.1f} | {s['range']:.1f} | {' '.join(f'{x:.1f}' for x in (s.get('points') or {}).values()) or '—'} |"
                      for v, s in spread.items()]
            parts.append("")
        over = result.get("verdicts over points") or {}
        if over:
            parts += ["| claim | verdict over points | holds / within noise / does not hold | mean difference | interval over points |",
                      "|---|---|---|---|---|"]
            parts += [f"| {claim} | **{v['verdict over points']}** | {v['holds on']} / {v['within noise on']} / {v['does not hold on']} | "
                      f"{'—' if v['mean difference'] is None else format(v['mean difference'], '+.1f')} | {v['interval over points']} |" for claim, v in over.items()]
            parts.append("")
        goals = goals_table(result) if result.get("kind") == "sweep" else pd.DataFrame()
        if not goals.empty:
            parts += ["The issues' goals for 08's models (`medcomp.goals`; ratios within a point, then averaged):\n",
                      *[f"- {goal}: {verdict}" for goal, verdict in goal_verdicts(goals).items()], "",
                      _markdown(goals.reset_index()), ""]
        timings = time_budget_table(result) if result.get("kind") == "sweep" else pd.DataFrame()
        if not timings.empty:
            parts += ["Issue 31's time goals, against each point's seconds per stage (the points share one bootstrap):\n",
                      time_budget_verdicts(timings), "", _markdown(timings.map(lambda v: None if pd.isna(v) else f"{v:,.0f}").rename_axis("point").reset_index()), ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def _markdown(table: pd.DataFrame) -> str:
    cell = lambda v: "—" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns),
                      *["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]])


def _annotation(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"<class '([^']+)'>", r"\1", text).replace("medcomp.params.", "")


def params_page() -> str:
    """``docs/params.md``: every key of the params schema, its type, default and description (from the schema)."""
    from pydantic import BaseModel

    lines = ["# Params\n", "Rendered by `python -m medcomp docs` from the schema in `medcomp/params.py` (its field descriptions); "
             "do not edit by hand. Every params file is validated against it before any work: an unknown key or a bad value "
             "fails, naming the file and the dotted key. A file with `base: <preset or path>` holds only the keys it changes.\n",
             "| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{prefix}{name}` | `{_annotation(annotation)}` | `{default}` | {meaning} |".replace("`''`", "`\"\"`"))

    walk(Params, "")
    return "\n".join(lines) + "\n"


def rendered_docs(root: Path = REPO_ROOT, results_dir: Path | None = None) -> dict[Path, str]:
    """Every generated page as it should be: ``docs/results.md``, ``docs/params.md``, and the README with its
    headline block re-rendered."""
    results = committed(results_dir or root / "results")
    readme = (root / "README.md").read_text()
    start, end = HEADLINE
    if start not in readme or end not in readme:
        raise ValueError(f"README.md lacks the headline markers {start!r} ... {end!r}")
    before, rest = readme.split(start, 1)
    after = rest.split(end, 1)[1]
    return {root / "docs" / "results.md": results_page(results), root / "docs" / "params.md": params_page(),
            root / "README.md": f"{before}{start}\n{headline_table(results)}\n{end}{after}"}


def write_docs(root: Path = REPO_ROOT, check: bool = False) -> list[Path]:
    """Write the generated pages (or, with ``check``, only list those that differ); returns the differing ones."""
    pages = rendered_docs(root)
    stale = [path for path, text in pages.items() if not path.exists() or path.read_text() != text]
    if not check:
        for path in stale:
            atomic_write_text(path, pages[path])
    return stale
