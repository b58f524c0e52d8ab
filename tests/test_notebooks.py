"""Committed notebooks are sources: no outputs, a papermill parameters cell with valid defaults."""

import ast
from pathlib import Path

import nbformat
import pytest

from medcomp.runner import discover_notebooks

NOTEBOOKS = discover_notebooks()


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "01_finetune.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path: Path):
    notebook = nbformat.read(str(path), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs: clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_defaults_are_valid(path: Path):
    notebook = nbformat.read(str(path), as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    defaults = {}
    exec(compile(ast.parse(cells[0].source), "parameters", "exec"), {}, defaults)
    assert set(defaults) == {"params_file", "run_dir"}, "only paths: secrets come from the environment"
    from medcomp.params import load_params

    load_params("kaggle_t4" if defaults["params_file"] == "auto" else defaults["params_file"])
    load_params("embedded")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_function_definitions_in_notebooks(path: Path):
    notebook = nbformat.read(str(path), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            tree = ast.parse("\n".join(line for line in cell.source.splitlines() if not line.startswith(("%", "!"))))
            assert not any(isinstance(node, (ast.FunctionDef, ast.ClassDef)) for node in ast.walk(tree))
