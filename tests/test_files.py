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
