"""Sweep points as jobs: settings refused before anything is submitted, and a real single-node Slurm
(scripts/slurm_local.sh) running points whose bits equal an inline sweep's, a killed job reported and resumed,
and the local executor running points in parallel."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medcomp.executors import SweepSettingsError, check_settings
from medcomp.params import SweepParams

ROOT = Path(__file__).resolve().parent.parent


def _fake_slurm(tmp_path, monkeypatch, partitions="debug*\ngpu\n", gres="gpu:2\n"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "exit 0"), ("sinfo", f'case "$*" in *%P*) printf "{partitions}";; *%G*) printf "{gres}";; esac')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_settings_that_cannot_run_are_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(SweepSettingsError, match="no `sbatch` on PATH"):
        check_settings(SweepParams(executor="slurm"))
    _fake_slurm(tmp_path, monkeypatch)
    check_settings(SweepParams(executor="slurm", partition="gpu", gpus_per_point=2))  # what the cluster has: accepted
    with pytest.raises(SweepSettingsError, match="'a100' is not a partition of this cluster \\(it has debug, gpu\\)"):
        check_settings(SweepParams(executor="slurm", partition="a100"))
    with pytest.raises(SweepSettingsError, match="gpus_per_point is 4 but a node of this partition has 2"):
        check_settings(SweepParams(executor="slurm", partition="gpu", gpus_per_point=4))
    with pytest.raises(SweepSettingsError, match="time_minutes is 60 but the plan estimates 1008 minutes"):
        check_settings(SweepParams(executor="slurm", time_minutes=60), point_minutes=1008.0)
    check_settings(SweepParams(executor="inline", time_minutes=1), point_minutes=1008.0)  # nothing submitted: no limit applies


def test_the_sweep_command_refuses_a_bad_setting_in_one_line_and_writes_no_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "medcomp", "sweep", "embedded", "--set", "seed=0,1", "--executor", "slurm",
                             "--sweep-dir", str(tmp_path / "sweep")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PATH": str(Path(sys.executable).parent)})
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --executor slurm: no `sbatch` on PATH")
    assert not (tmp_path / "sweep" / "seed0").exists()


# ------------------------------------------------------------------ a real single-node Slurm (slow)

def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return any(state in ("idle", "mixed", "allocated") for state in states)


@pytest.fixture(scope="module")
def slurm():
    if not _slurm_up():
        started = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True, text=True,
                                 timeout=120) if shutil.which("slurmctld") else None
        if started is None or started.returncode != 0:
            if os.environ.get("CI"):
                raise AssertionError("no Slurm: .ci/run installs and starts it (scripts/slurm_local.sh)")
            pytest.skip("no Slurm here (bash scripts/slurm_local.sh install && bash scripts/slurm_local.sh start)")
    yield


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    from test_end_to_end import MINIMAL, write_params

    folder = tmp_path_factory.mktemp("sweeps")
    return write_params(folder / "minimal.yaml", "embedded", MINIMAL), folder, folder / "cache"


def _sweep(minimal, name: str, *options: str, wait: bool = True):
    params, folder, cache = minimal
    command = [sys.executable, "-m", "medcomp", "sweep", str(params), "--set", "seed=0,1", "--only", "01_finetune",
               "--sweep-dir", str(folder / name), *options]
    env = {**os.environ, "MEDCOMP_CACHE": str(cache)}
    if not wait:  # as a user's terminal starts it: Ctrl-C interrupts (a shell's background job, as CI may run, ignores SIGINT)
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=folder,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=2400, cwd=folder)


def _artefacts(sweep_dir: Path) -> dict[str, dict[str, str]]:
    return {seed: json.loads((sweep_dir / seed / "manifest.json").read_text())["artefacts"] for seed in ("seed0", "seed1")}


@pytest.fixture(scope="module")
def inline_sweep(minimal):
    result = _sweep(minimal, "inline")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return minimal[1] / "inline"


@pytest.mark.slow
def test_a_seed_sweep_runs_one_folder_per_point_shares_the_data_and_reseeds_the_bootstrap(minimal, inline_sweep):
    """The inline sweep the executor tests compare with (seeds 0 and 1, 01 only): one folder and one bootstrap per point,
    the data built once. (It had its own identical sweep in test_sweep.py: the same minutes twice in CI.)"""
    import yaml

    cache = minimal[2]
    for seed in (0, 1):
        point = inline_sweep / f"seed{seed}"
        assert json.loads((point / "manifest.json").read_text())["params"]["seed"] == seed
        assert yaml.safe_load((inline_sweep / "points" / f"seed{seed}.yaml").read_text())["seed"] == seed
        assert (point / "stages" / "01_finetune" / "summary.json").exists()
    pretrained = [path for path in (cache / "models").iterdir() if "-pretrained-" in path.name and "." not in path.name]
    assert len(pretrained) == 2, "the seed is the bootstrap's too: one per point"
    datasets = sorted(path.name.rsplit("-", 1)[0] for path in (cache / "datasets").iterdir())
    assert datasets == ["dermnet-synthetic", "pretraining"], "the data and the pretraining images are built once and shared"
    index = (inline_sweep / "index.html").read_text()
    assert "seed0" in index and "seed1" in index and "01_finetune · naming accuracy" in index
    assert "<li>01-07 within 20 min: <b>not measured</b> in this sweep</li>" in index  # only 01 ran: the time goals say so instead of summing a part


SLURM = ("--executor", "slurm", "--cpus-per-point", "1", "--mem-gb", "4", "--time-minutes", "60")


@pytest.mark.slow
def test_a_slurm_sweep_runs_each_point_as_a_job_with_the_inline_sweeps_bits(slurm, minimal, inline_sweep):
    result = _sweep(minimal, "slurm", *SLURM)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = minimal[1] / "slurm"
    points = json.loads((sweep_dir / "points.json").read_text())
    assert {p["executor"] for p in points.values()} == {"slurm"} and all(p["status"] == "ok" and p["job_id"] for p in points.values())
    assert len({p["job_id"] for p in points.values()}) == 2  # two jobs
    assert _artefacts(sweep_dir) == _artefacts(inline_sweep) and _artefacts(sweep_dir)["seed0"]["01_finetune"]  # bit for bit
    index = (sweep_dir / "index.html").read_text()
    assert "Where each point ran" in index and all(f"<td>{p['job_id']}</td>" in index for p in points.values())
    assert "accounting storage is disabled" not in result.stderr


@pytest.mark.slow
def test_a_cancelled_job_is_reported_and_a_second_run_finishes_only_it(slurm, minimal, inline_sweep):
    running = _sweep(minimal, "cancel", *SLURM, wait=False)
    sweep_dir = minimal[1] / "cancel"
    deadline = time.monotonic() + 300
    job = None
    while job is None and time.monotonic() < deadline:  # the first point's job, once it runs
        time.sleep(1)
        logs = sorted((sweep_dir / "jobs").glob("*_submitted.pkl")) if (sweep_dir / "jobs").exists() else []
        job = logs[0].name.split("_")[0] if logs else None
    assert job, "no job was submitted"
    time.sleep(5)
    subprocess.run(["scancel", job], check=True)
    output, _ = running.communicate(timeout=2400)
    assert running.returncode == 1, output[-3000:]
    points = json.loads((sweep_dir / "points.json").read_text())
    cancelled = [name for name, p in points.items() if p["status"] == "cancelled"]
    assert len(cancelled) == 1 and "Slurm state CANCELLED" in points[cancelled[0]]["reason"], points
    finished_before = [name for name in points if name not in cancelled]
    again = _sweep(minimal, "cancel", *SLURM)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    points = json.loads((sweep_dir / "points.json").read_text())
    assert all(points[name]["status"] == "ok" for name in cancelled)  # submitted again, and finished
    assert all(points[name]["status"] in ("ok", "skipped") for name in finished_before)
    assert f"sweep point {finished_before[0]}: submitted" not in again.stderr + again.stdout  # not redone
    assert _artefacts(sweep_dir) == _artefacts(minimal[1] / "inline")


@pytest.mark.slow
def test_the_local_executor_runs_points_in_parallel_with_the_inline_bits(minimal, inline_sweep):
    result = _sweep(minimal, "local", "--executor", "local", "--max-parallel", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    points = json.loads((minimal[1] / "local" / "points.json").read_text())
    assert {p["executor"] for p in points.values()} == {"local"} and all(p["status"] == "ok" for p in points.values())
    assert _artefacts(minimal[1] / "local") == _artefacts(inline_sweep)


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs_the_sweep_submitted(slurm, minimal):
    running = _sweep(minimal, "interrupted", *SLURM, wait=False)
    jobs_dir = minimal[1] / "interrupted" / "jobs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(jobs_dir.glob("*_submitted.pkl")) if jobs_dir.exists() else []) < 2:
        time.sleep(1)
    jobs = sorted((p.name.split("_")[0] for p in jobs_dir.glob("*_submitted.pkl")), key=int)
    assert len(jobs) == 2
    time.sleep(3)
    running.send_signal(signal.SIGINT)
    output, _ = running.communicate(timeout=300)
    assert running.returncode != 0 and f"cancelled 2 job(s) ({', '.join(jobs)})" in output, output[-2000:]
    deadline = time.monotonic() + 120  # a cancelled job stays in squeue while it completes (CG), then leaves
    while time.monotonic() < deadline and set(jobs) & set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()):
        time.sleep(2)
    assert not set(jobs) & set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split())
