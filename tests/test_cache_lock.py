"""A shared cache entry is built once when two processes ask for it at the same moment, and both read the same bytes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from medcomp.files import atomic_directory, build_once


def _build(target: str, log: str, barrier) -> str:
    target_path = Path(target)

    def build() -> None:
        with open(log, "a") as handle:  # one line per build that ran
            handle.write(f"built by {multiprocessing.current_process().name}\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        with atomic_directory(target_path) as staging:
            (staging / "model.bin").write_bytes(multiprocessing.current_process().name.encode() * 1000)

    barrier.wait()  # both ask at the same moment
    build_once(target_path, lambda p: (p / "model.bin").exists(), build)
    return (target_path / "model.bin").read_bytes().hex()


def test_two_processes_build_the_same_entry_once_and_read_the_same_bytes(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    target, log = tmp_path / "cache" / "models" / "entry", tmp_path / "builds.log"
    with context.Pool(2) as pool:
        contents = pool.starmap(_build, [(str(target), str(log), barrier)] * 2)
    assert len(log.read_text().splitlines()) == 1  # one built, the other waited on the lock and found it built
    assert contents[0] == contents[1] and len(contents[0]) > 0


def test_an_entry_already_built_is_not_built_again_and_a_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "entry"
    calls = []

    def failing() -> None:
        with atomic_directory(target) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("killed midway")

    try:
        build_once(target, lambda p: p.exists(), failing)
    except RuntimeError:
        pass
    assert not target.exists()  # the staging folder was dropped: nobody reads half an entry
    assert build_once(target, lambda p: p.exists(), lambda: (calls.append(1), target.mkdir())) is True
    assert build_once(target, lambda p: p.exists(), lambda: calls.append(2)) is False and calls == [1]


def _timed(lock_path: str, barrier) -> tuple[float, float]:
    from medcomp.benchmark import node_timing_lock

    barrier.wait()
    with node_timing_lock(lock_path):
        started = time.monotonic()
        time.sleep(0.5)
        return started, time.monotonic()


def test_two_points_on_one_machine_never_time_at_once(tmp_path):
    """06's measurements take the node's timing lock: two sweep points that reach 06 together time one after the other."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    with context.Pool(2) as pool:
        (a_start, a_end), (b_start, b_end) = sorted(pool.starmap(_timed, [(str(tmp_path / "timing.lock"), barrier)] * 2))
    assert b_start >= a_end  # the second began after the first ended
