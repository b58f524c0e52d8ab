"""Papermill batches: one run folder per point of a parameter grid, and one index comparing the points.

``python -m medcomp sweep PARAMS --set seed=0,1,2 [--set key=a,b ...]`` runs the notebooks once per
point of the grid (every combination of the values), each point a run folder of its own under
``reports/<run_name>-sweep/``, with its own params file beside it. Work that does not depend on the
swept keys is shared through the cache (``$MEDCOMP_CACHE``): the embedded model's bootstrap and the
datasets are built once, keyed by the settings they depend on. The sweep's index puts every point's
key figures side by side, then, for every variant, the mean and spread of its score over the points,
and for every claim of the paper how many points it holds on. Over seeds, a claim *holds* only where
it holds on every seed, and its interval is the union of the seeds' intervals: it covers the items'
noise and the seed-to-seed spread both.
"""

from __future__ import annotations

import html
import json
import itertools
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from medcomp import results
from medcomp.files import atomic_write_text
from medcomp.goals import goal_verdicts, goals_table, time_budget_table, time_budget_verdicts
from medcomp.params import ParamsError, SweepParams, load_params, merge_overrides, resolve_params_path
from medcomp.executors import check_settings, run_points, write_outcomes
from medcomp.runs import REPORTS_DIR, Run



def parse_setting(text: str) -> tuple[str, list[Any]]:
    """``key.sub=v1,v2`` -> (``key.sub``, [v1, v2]), each value read as YAML (numbers stay numbers)."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected KEY=VALUE[,VALUE...], e.g. seed=0,1,2")
    key, values = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ParamsError(f"--set {text!r}: {key!r} is not a dotted params key")
    parsed = [_value(value) for value in values.split(",") if value.strip() != ""]
    if not parsed:
        raise ParamsError(f"--set {text!r}: no values")
    return key.strip(), parsed


def _value(text: str) -> Any:
    """YAML's reading of one value, and numbers YAML 1.1 leaves as text (``1e-3``) as numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def nested(key: str, value: Any) -> dict[str, Any]:
    """``a.b.c``, v -> {"a": {"b": {"c": v}}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def grid(settings: Sequence[str]) -> list[dict[str, Any]]:
    """Every combination of the ``--set`` values, as {dotted key: value}."""
    parsed = [parse_setting(text) for text in settings]
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ParamsError(f"--set names a key twice: {keys}")
    return [dict(zip(keys, combination)) for combination in itertools.product(*(values for _, values in parsed))]


def point_name(point: dict[str, Any]) -> str:
    return "-".join(f"{key.split('.')[-1]}{value}" for key, value in point.items()).replace("/", "_")


def run_sweep(params_file: str | Path, settings: Sequence[str], only: Sequence[str] | None = None, force: bool = False,
              sweep_dir: Path | None = None, where: dict[str, Any] | None = None) -> Path:
    """Run every point (each validated, and the executor's settings checked, before any runs) where ``sweep:`` and
    ``where`` (the command line's executor options) say, then write the sweep's index; returns its folder."""
    base_path = resolve_params_path(params_file)
    base = yaml.safe_load(base_path.read_text())
    if "base" in base:  # a preset that changes another's keys: the points get the whole file
        base = merge_overrides(yaml.safe_load(resolve_params_path(base.pop("base")).read_text()), base)
    base_params = load_params(base_path)
    try:
        executor_settings = SweepParams(**{**base_params.sweep.model_dump(), **{k: v for k, v in (where or {}).items() if v is not None}})
    except ValueError as error:
        raise ParamsError(f"sweep settings: {error}") from None
    check_settings(executor_settings, _point_minutes(base_params))
    sweep_dir = Path(sweep_dir or REPORTS_DIR / f"{base_params.run_name}-sweep").resolve()
    points = grid(settings)
    files = {}
    for point in points:  # all points validated first: a typo fails before hours of work
        name = point_name(point)
        raw = base
        for key, value in point.items():
            raw = merge_overrides(raw, nested(key, value))
        raw["run_name"] = f"{base_params.run_name}-{name}"
        path = sweep_dir / "points" / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
        load_params(path)
        files[name] = (point, path)
    outcomes = run_points({name: (path, sweep_dir / name) for name, (_, path) in files.items()}, executor_settings, sweep_dir / "jobs", only, force)
    write_outcomes(sweep_dir, outcomes)
    failed = [name for name, outcome in outcomes.items() if outcome.status not in ("ok", "skipped")]
    write_sweep_index(sweep_dir, {name: point for name, (point, _) in files.items()})
    results.write_sweep_results(sweep_dir, {name: point for name, (point, _) in files.items()})
    if failed:
        raise RuntimeError(f"sweep points failed: {failed}; see {sweep_dir / 'index.html'}")
    return sweep_dir


def _point_minutes(params) -> float | None:
    """The plan's estimate for one point (T4 hours, when the model's shape is known before the run), in minutes."""
    from medcomp import plan

    shape = plan.shape_for_params(params)
    return None if shape is None else sum(p.seconds for p in plan.stage_plans(plan.with_batch_sizes(params), shape)) / 60


def where_points_ran(sweep_dir: Path) -> pd.DataFrame:
    """Each point's executor, host, job id, GPUs, wall time, status and reason (``points.json``), and the CPU its
    numerics fingerprint names; points on other CPUs than the first are flagged, as their bits may differ."""
    path = sweep_dir / "points.json"
    if not path.exists():
        return pd.DataFrame()
    frame = pd.DataFrame.from_dict(json.loads(path.read_text()), orient="index").drop(columns=["name"], errors="ignore")
    cpus = {}
    for name in frame.index:
        manifest = sweep_dir / name / "manifest.json"
        cpus[name] = (json.loads(manifest.read_text()).get("numerics") or {}).get("cpu") if manifest.exists() else None
    frame["cpu (numerics)"] = pd.Series(cpus)
    known = [cpu for cpu in frame["cpu (numerics)"] if cpu]
    frame["other CPU than the first"] = [bool(cpu and known and cpu != known[0]) for cpu in frame["cpu (numerics)"]]
    return frame


def score_spread(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per variant, its score at every point, their mean, standard deviation and range (``results.score_spread``)."""
    spread = results.score_spread({point: table["score"].to_dict() for point, table in scores.items()})
    return pd.DataFrame({variant: {**s["points"], "mean": s["mean"], "sd": s["sd"], "range": s["range"]} for variant, s in spread.items()}).T


def verdicts_over_points(verdicts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per claim, the verdict over the points (``results.verdicts_over_points``): *holds* (or *does not hold*)
    only where every point agrees, *within noise* where every point is, else *mixed*."""
    over = results.verdicts_over_points({point: {claim: {"verdict": row["verdict"], "difference": row["difference [95% CI]"]}
                                                 for claim, row in table.iterrows()} for point, table in verdicts.items()})
    return pd.DataFrame.from_dict(over, orient="index").rename_axis("claim") if over else pd.DataFrame()


def frontier_over_points(sweep_dir: Path, points: Sequence[str]) -> pd.DataFrame:
    """Per variant, over the points that scored and measured it: score × finetuned (mean, standard deviation),
    model bytes × finetuned and decode × finetuned (means): 07's frontier with its spread over seeds."""
    from medcomp.benchmark import efficiency_table, load_measurements

    frames = []
    for name in points:
        scores, bench = results.judge_table(sweep_dir / name, "scores"), sweep_dir / name / "stages" / "06_benchmark"
        if scores is None or not (bench / "benchmark.json").exists() or "finetuned" not in scores.index:
            continue
        efficiency = efficiency_table(load_measurements(bench)[0], "finetuned")
        joined = (scores[["score"]] / float(scores.loc["finetuned", "score"])).join(efficiency[["model MB × finetuned", "decode × finetuned"]], how="inner")
        frames.append(joined.rename(columns={"score": "score × finetuned"}))
    if not frames:
        return pd.DataFrame()
    stacked = pd.concat(frames)
    grouped = stacked.groupby(level=0)
    table = grouped.mean().join(grouped["score × finetuned"].std().rename("score × finetuned sd")).join(grouped.size().rename("points"))
    return table.sort_values("model MB × finetuned").round(3)


def frontier_figure_html(table: pd.DataFrame) -> str:
    """The frontier over the points as an inline PNG: each variant's mean score × finetuned against its bytes, ± sd."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    axes.errorbar(table["model MB × finetuned"], table["score × finetuned"], yerr=table["score × finetuned sd"].fillna(0), fmt="o", capsize=3)
    for name, row in table.iterrows():
        axes.annotate(str(name), (row["model MB × finetuned"], row["score × finetuned"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("model bytes × finetuned")
    axes.set_ylabel("score × finetuned (mean ± sd over the points)")
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img alt="frontier over the points" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def write_sweep_index(sweep_dir: Path, points: dict[str, dict[str, Any]]) -> Path:
    """The sweep's ``index.html``: each point's key figures per stage, the score spread and the verdicts over points."""
    figures = {}
    for name in points:
        run = Run(sweep_dir / name)
        figures[name] = {f"{stage} · {key}": value for stage in sorted(p.name for p in (sweep_dir / name / "stages").glob("0*"))
                         for key, value in run.summary(stage).items() if "(s)" not in key and "GiB" not in key}
    key_figures = pd.DataFrame(figures)
    scores = {name: t for name in points if (t := results.judge_table(sweep_dir / name, "scores")) is not None}
    verdicts = {name: t for name in points if (t := results.judge_table(sweep_dir / name, "verdicts")) is not None}
    parts = [f"<h1>medcomp sweep <code>{html.escape(sweep_dir.name)}</code></h1>",
             "<p>Points: " + ", ".join(f'<a href="{html.escape(n)}/index.html">{html.escape(n)}</a> ({html.escape(str(p))})' for n, p in points.items()) + "</p>",
             "<h2>Key figures, point by point</h2>", key_figures.to_html(escape=True)]
    where = where_points_ran(sweep_dir)
    if not where.empty:
        parts += ["<h2>Where each point ran</h2><p>A point on another CPU than the first may compute other bits "
                  "(docs/reproducibility.md).</p>", where.to_html(escape=True)]
    if scores:
        parts += ["<h2>Scores over the points (mean, standard deviation, range)</h2>", score_spread(scores).to_html(escape=True)]
    frontier = frontier_over_points(sweep_dir, list(points))
    if not frontier.empty:
        parts += ["<h2>The frontier over the points</h2><p>07's score and 06's bytes and decode time as ratios to each point's "
                  "finetuned model; the spread is the standard deviation over the points.</p>", frontier_figure_html(frontier), frontier.to_html(escape=True)]
    record = results.sweep_results(sweep_dir, points)
    goals = goals_table(record)
    if not goals.empty:
        parts += ["<h2>The issues' goals for 08's models, over the points</h2><p>Every candidate the goal names, with each check; "
                  "ratios are taken within a point, then averaged.</p><ul>"
                  + "".join(f"<li>{html.escape(goal)}: {html.escape(verdict)}</li>" for goal, verdict in goal_verdicts(goals).items()) + "</ul>",
                  goals.to_html(escape=True, float_format=lambda x: f"{x:.3f}")]
    timings = time_budget_table(record)
    if not timings.empty:
        bold = lambda line: re.sub(r"[*][*](.+?)[*][*]", r"<b>\1</b>", html.escape(line.removeprefix("- ")))  # noqa: E731
        parts += ["<h2>Time goals, point by point</h2><p>Issue 31's budgets against each point's seconds per stage; the points "
                  "share one bootstrap, so these are not <code>make report</code>'s from an empty cache.</p><ul>"
                  + "".join(f"<li>{bold(line)}</li>" for line in time_budget_verdicts(timings).splitlines()) + "</ul>",
                  timings.to_html(escape=True, float_format=lambda x: f"{x:,.0f}")]
    if verdicts:
        parts += ["<h2>The paper's claims, and this package's, over the points</h2><p>A claim holds only where it holds on every point; its interval "
                  "is the union of the points' paired-bootstrap intervals.</p>", verdicts_over_points(verdicts).to_html(escape=True)]
    page = ('<!doctype html><html><head><meta charset="utf-8"><title>medcomp sweep</title><style>body{font-family:sans-serif;margin:2em}'
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
            + "".join(parts) + "</body></html>")
    target = sweep_dir / "index.html"
    atomic_write_text(target, page)
    return target

