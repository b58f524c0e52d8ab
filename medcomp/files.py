"""Atomic writes: a crash or Ctrl-C never leaves a half-written file or directory behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def content_hash(data: Any, length: int = 12) -> str:
    """A short stable hash of JSON-able ``data``: names cached builds after what they were built from."""
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it: a reader sees the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path | str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: Path | str, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


WRITE_ID = ".medcomp-write-id"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_abandoned_staging(target: Path) -> list[Path]:
    """Delete staging folders of ``target`` whose writer is dead (a SIGKILL, the OOM killer): a killed
    model write leaves gigabytes behind otherwise. A staging folder names its writer's PID."""
    removed = []
    for staging in Path(target).parent.glob(f".{Path(target).name}.*.tmp"):
        pid = staging.name[len(Path(target).name) + 2 :].split(".", 1)[0]
        if staging.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


@contextmanager
def atomic_directory(target: Path, write_id: str | None = None) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only if the block finishes.

    The finished folder carries a ``WRITE_ID``: it names this write, survives a copy or a move (unlike
    modification times), and changes whenever the folder is rewritten. Random by default; a folder
    rebuilt by a deterministic recipe passes the recipe's hash, so a rebuild is recognised as the same.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield staging
        (staging / WRITE_ID).write_text(write_id or uuid.uuid4().hex)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_once(target: Path | str, is_built: Callable[[Path], bool], build: Callable[[], Any]) -> bool:
    """Build a shared cache entry at most once, whoever asks: ``build()`` runs only if ``is_built(target)`` is
    false, under a lock per entry (``filelock``, in ``.locks`` beside the entry's folder: in the shared cache, so it holds
    across a cluster's nodes, and out of the folders that list entries), checked again once the lock is held. Two
    sweep points that need the same bootstrap at the same moment: one builds, the other waits and reads what
    the first wrote (``build`` writes through ``atomic_directory``, so nobody reads half an entry). Returns
    whether this call built it."""
    from filelock import FileLock

    target = Path(target)
    if is_built(target):
        return False
    locks = target.parent.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{target.parent.name}-{target.name}.lock")):
        if is_built(target):
            return False
        build()
        return True
