import json

import pytest

from medcomp.files import atomic_directory, atomic_write_json, read_jsonl, atomic_write_jsonl


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_previous(tmp_path):
    target = tmp_path / "model"
    for content in ("old", "new"):
        with atomic_directory(target) as staging:
            (staging / "weights").write_text(content)
    assert (target / "weights").read_text() == "new"


def test_json_round_trips(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    atomic_write_jsonl(tmp_path / "a.jsonl", [{"a": 1}, {"b": 2}])
    assert read_jsonl(tmp_path / "a.jsonl") == [{"a": 1}, {"b": 2}]


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from medcomp.files import atomic_directory

    target = tmp_path / "model"
    # a writer killed by SIGKILL mid-write: its staging folder (named after its PID) stays behind
    child = subprocess.run([sys.executable, "-c", f"""
import os, signal
from medcomp.files import atomic_directory
with atomic_directory(__import__('pathlib').Path({str(target)!r})) as staging:
    (staging / 'weights.bin').write_bytes(b'x' * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""], capture_output=True)
    assert child.returncode == -9
    leftovers = list(tmp_path.glob(".model.*.tmp"))
    assert len(leftovers) == 1 and (leftovers[0] / "weights.bin").exists()
    live = tmp_path / f".model.{os.getpid()}.inflight.tmp"  # a live writer's folder is left alone
    live.mkdir()
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"y")
    assert not leftovers[0].exists() and live.exists() and (target / "weights.bin").read_bytes() == b"y"
