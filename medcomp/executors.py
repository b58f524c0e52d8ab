"""Where a sweep's points run: here one after another (``inline``), here in parallel (``local``: submitit's
``LocalExecutor``, at most ``max_parallel`` at once, one GPU each where there are GPUs), or one Slurm job each
(``slurm``: submitit's ``AutoExecutor``). A point's job calls the same ``run_pipeline`` as ``inline``.

submitit, not a scheduler of our own: Meta's research code sends its sweeps through it, and its local and Slurm
executors take the same call. What is added here:
- ``check_settings`` stops the sweep before anything is submitted when a setting cannot work: no ``sbatch``, an
  unknown partition, more GPUs than a node has, a time limit under the plan's estimate for a point.
- Finished points (every stage ok) are not submitted again; failed, cancelled and timed-out ones are.
- A job Slurm ends without a result (``scancel``, its time limit, a lost node) is seen through ``squeue`` and
  ``scontrol``, so the sweep does not need Slurm's accounting (``sacct``, which a single node without slurmdbd
  lacks; submitit's calls to it are silenced), and is reported with Slurm's state and reason.
- Ctrl-C cancels every job this process submitted, and says so.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from medcomp.params import SweepParams
from medcomp.runs import RUN_ORDER, Run

STAGES = RUN_ORDER


class SweepSettingsError(ValueError):
    """A sweep setting that cannot work; raised before anything is submitted."""


@dataclass
class PointOutcome:
    name: str
    executor: str
    status: str  # ok, failed, cancelled, timeout, skipped (finished before)
    host: str | None = None
    job_id: str | None = None
    gpus: str | None = None
    seconds: float | None = None
    reason: str | None = None


def _slurm_lines(*command: str) -> list[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SweepSettingsError(f"`{' '.join(command)}` failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def check_settings(settings: SweepParams, point_minutes: float | None = None) -> None:
    """Refuse, in one line naming the cause, settings that cannot run: before any point is submitted."""
    if settings.executor == "slurm":
        if shutil.which("sbatch") is None:
            raise SweepSettingsError("--executor slurm: no `sbatch` on PATH (is this a Slurm login node? `bash scripts/slurm_local.sh start` makes one here)")
        partitions = [p.rstrip("*") for p in _slurm_lines("sinfo", "-h", "-o", "%P")]
        if settings.partition is not None and settings.partition not in partitions:
            raise SweepSettingsError(f"sweep.partition {settings.partition!r} is not a partition of this cluster (it has {', '.join(partitions)})")
        if settings.gpus_per_point:
            command = ["sinfo", "-h", "-o", "%G"] + (["-p", settings.partition] if settings.partition else [])
            gpus = max((int(g.split(":")[-1].split("(")[0]) for line in _slurm_lines(*command) for g in line.split(",")
                        if g.startswith("gpu") and g.split(":")[-1].split("(")[0].isdigit()), default=0)
            if gpus < settings.gpus_per_point:
                raise SweepSettingsError(f"sweep.gpus_per_point is {settings.gpus_per_point} but a node of this partition has {gpus} GPU(s)")
    elif settings.executor == "local" and settings.gpus_per_point:
        import torch

        if torch.cuda.device_count() < settings.gpus_per_point * min(settings.max_parallel, 1):
            raise SweepSettingsError(f"sweep.gpus_per_point is {settings.gpus_per_point} but this machine has {torch.cuda.device_count()} GPU(s)")
    if settings.executor != "inline" and point_minutes is not None and settings.time_minutes < point_minutes:
        raise SweepSettingsError(f"sweep.time_minutes is {settings.time_minutes} but the plan estimates {point_minutes:.0f} minutes for one point")


def finished(run_dir: Path, stages: Sequence[str] | None = None) -> bool:
    """Whether every stage asked of a point (all, or ``--only``'s) is ok: a rerun of the sweep skips the point."""
    def ok(stage: str) -> bool:
        path = Run(run_dir).stage_dir(stage) / "status.json"
        return path.exists() and json.loads(path.read_text()).get("status") == "ok"

    return all(ok(stage) for stage in (stages or STAGES))


def run_point(params_path: str, run_dir: str, only: Sequence[str] | None = None, force: bool = False) -> dict[str, Any]:
    """What a point's job runs: the same ``run_pipeline`` as an inline sweep, and where it ran."""
    import os

    from medcomp.runner import run_pipeline

    started = time.perf_counter()
    outcomes = run_pipeline(params_path, force=force, only=only, run_dir=run_dir)
    return {"statuses": {o.stage: o.status for o in outcomes}, "host": socket.gethostname(), "seconds": round(time.perf_counter() - started, 1),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "job_id": os.environ.get("SLURM_JOB_ID")}


def _quiet_submitit() -> None:
    """Without Slurm accounting (a single node with no slurmdbd) every poll of submitit's watcher runs ``sacct``, which
    prints "accounting storage is disabled" and fails; ``scontrol`` answers instead (``_slurm_state``). So the watcher
    is told to ask nothing there, and its warnings are silenced; with accounting it works as submitted."""
    logging.getLogger("submitit").setLevel(logging.ERROR)
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout if shutil.which("scontrol") else ""
    if "accounting_storage/none" in config:
        from submitit.slurm.slurm import SlurmJob

        SlurmJob.watcher._make_command = lambda: None  # the shared watcher of every Slurm job of this process


def _slurm_state(job_id: str) -> tuple[str, str | None]:
    """A Slurm job's state and reason from ``scontrol`` (no accounting needed); ("UNKNOWN", None) once forgotten."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    return fields.get("JobState", "UNKNOWN"), fields.get("Reason") if fields.get("Reason") not in (None, "None") else None


def _ended(job, executor: str) -> bool:
    if job.done():
        return True
    if executor == "slurm":
        return _slurm_state(job.job_id)[0] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")
    return False


def _outcome(name: str, job, executor: str) -> PointOutcome:
    if executor == "slurm" and not job.paths.result_pickle.exists():
        # ended without a result (scancel, time limit, a lost node): job.result() would wait for a state that
        # submitit reads from sacct, which a cluster without accounting never gives; scontrol says what happened
        state, reason = _slurm_state(job.job_id)
        status = {"CANCELLED": "cancelled", "TIMEOUT": "timeout"}.get(state.split()[0], "failed")
        return PointOutcome(name, executor, status, job_id=str(job.job_id), reason=f"Slurm state {state}" + (f", reason {reason}" if reason else ""))
    try:
        result = job.result()
    except Exception as error:  # noqa: BLE001  a job that died is a failed point, with why
        state, reason = _slurm_state(job.job_id) if executor == "slurm" else ("FAILED", None)
        status = {"CANCELLED": "cancelled", "TIMEOUT": "timeout"}.get(state.split()[0], "failed")
        last = str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__
        return PointOutcome(name, executor, status, job_id=str(job.job_id), reason=f"Slurm state {state}" + (f", reason {reason}" if reason else "")
                            if executor == "slurm" else last)
    status = "ok" if all(s in ("ok", "reused", "not run") for s in result["statuses"].values()) else "failed"
    failed = [stage for stage, s in result["statuses"].items() if s in ("failed", "incomplete")]
    return PointOutcome(name, executor, status, result["host"], str(job.job_id), result["gpus"], result["seconds"],
                        f"stages {', '.join(failed)}" if failed else None)


def run_points(points: dict[str, tuple[Path, Path]], settings: SweepParams, folder: Path, only: Sequence[str] | None = None,
               force: bool = False, progress: Callable[[str], None] = print) -> dict[str, PointOutcome]:
    """Run each point (name -> (params file, run folder)) where ``settings`` say; returns each point's outcome."""
    outcomes: dict[str, PointOutcome] = {}
    todo = {}
    for name, (params_path, run_dir) in points.items():
        if not force and finished(run_dir, only):
            outcomes[name] = PointOutcome(name, settings.executor, "skipped", reason="every stage asked finished before (--force redoes it)")
        else:
            todo[name] = (params_path, run_dir)
    if settings.executor == "inline":
        for name, (params_path, run_dir) in todo.items():
            progress(f"[medcomp] sweep point {name}")
            result = run_point(str(params_path), str(run_dir), only, force)
            failed = [stage for stage, s in result["statuses"].items() if s in ("failed", "incomplete")]
            outcomes[name] = PointOutcome(name, "inline", "failed" if failed else "ok", result["host"], None, result["gpus"], result["seconds"],
                                          f"stages {', '.join(failed)}" if failed else None)
        return outcomes
    import submitit

    _quiet_submitit()
    folder.mkdir(parents=True, exist_ok=True)
    if settings.executor == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=settings.time_minutes, gpus_per_node=settings.gpus_per_point)
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        executor.update_parameters(timeout_min=settings.time_minutes, gpus_per_node=settings.gpus_per_point, cpus_per_task=settings.cpus_per_point,
                                   mem_gb=settings.mem_gb, name="medcomp-sweep", **({"slurm_partition": settings.partition} if settings.partition else {}))
    from tqdm import tqdm

    limit = settings.max_parallel if settings.executor == "local" else len(todo)
    waiting, running = list(todo.items()), {}
    bar = tqdm(total=len(todo), desc=f"sweep ({settings.executor})", unit="point")
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                name, (params_path, run_dir) = waiting.pop(0)
                running[name] = executor.submit(run_point, str(params_path), str(run_dir), list(only) if only else None, force)
                bar.write(f"[medcomp] sweep point {name}: submitted ({settings.executor}, job {running[name].job_id})")
            for name, job in list(running.items()):
                if _ended(job, settings.executor):
                    outcomes[name] = _outcome(name, job, settings.executor)
                    del running[name]
                    bar.update(1)
                    bar.write(f"[medcomp] sweep point {name}: {outcomes[name].status}" + (f" ({outcomes[name].reason})" if outcomes[name].reason else ""))
            failed = sum(o.status in ("failed", "cancelled", "timeout") for o in outcomes.values())
            bar.set_postfix_str(f"{len(running)} running, {len(waiting)} queued, {failed} failed", refresh=True)
            time.sleep(2 if running else 0)
        bar.close()
    except KeyboardInterrupt:
        bar.close()
        for name, job in running.items():
            job.cancel(check=False)
            outcomes[name] = PointOutcome(name, settings.executor, "cancelled", job_id=str(job.job_id), reason="Ctrl-C in the submitting process")
        progress(f"[medcomp] sweep interrupted: cancelled {len(running)} job(s) ({', '.join(str(j.job_id) for j in running.values())})")
        raise
    return outcomes


def write_outcomes(sweep_dir: Path, outcomes: dict[str, PointOutcome]) -> Path:
    """``points.json``: where and how each point ran (the sweep's index shows it)."""
    from medcomp.files import atomic_write_json

    target = Path(sweep_dir) / "points.json"
    previous = json.loads(target.read_text()) if target.exists() else {}
    atomic_write_json(target, {**previous, **{name: asdict(o) for name, o in outcomes.items() if o.status != "skipped" or name not in previous}})
    return target
