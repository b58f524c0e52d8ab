"""The package's shape: the layers contract in pyproject.toml holds, and it would catch a violation."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "medcomp"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_layers_contract_is_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, upward", [("files", "from medcomp import runner"),  # the bottom importing the top
                                            ("loading", "from medcomp.stages import quantize"),  # an algorithm importing orchestration
                                            ("training", "from medcomp import quantizers")])  # two modules of one layer
def test_contract_catches_an_upward_or_sideways_import(tmp_path, module, upward):
    shutil.copytree(PACKAGE, tmp_path / "medcomp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "medcomp" / f"{module}.py"
    target.write_text(target.read_text() + f"\n\ndef _violation():\n    {upward}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "broken" in result.stdout


def test_every_module_names_its_job_and_stays_small():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(REPO)} has no module docstring saying its job"
        assert len(text.splitlines()) <= 400, f"{path.relative_to(REPO)} has {len(text.splitlines())} lines (limit 400)"
