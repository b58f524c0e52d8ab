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
def test_every_cell_has_a_unique_id(path: Path):
    """nbformat warns on every read of a cell without an id ("this will become a hard error"), once per notebook of a run,
    and the runner's section announcer finds cells by id."""
    import json

    cells = json.loads(path.read_text())["cells"]
    ids = [cell.get("id") for cell in cells]
    assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: cells without an id or with the same one"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_imported_name_is_assigned_over(path: Path):
    """A module imported in one cell and a variable of the same name assigned in another: which one a later cell reads
    depends on the order cells ran (08 once assigned ``results = ...`` after ``from medcomp import results``, and the
    cell that read the module failed only in a full run)."""
    notebook = nbformat.read(str(path), as_version=4)
    trees = [ast.parse(cell.source) for cell in notebook.cells if cell.cell_type == "code"]
    imported = {alias.asname or alias.name.split(".")[0] for tree in trees for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assigned = {target.id for tree in trees for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.comprehension))
                for target in ast.walk(node.target if not isinstance(node, ast.Assign) else ast.Tuple(elts=node.targets))
                if isinstance(target, ast.Name)}
    assert not imported & assigned, f"{path.name}: names both imported and assigned: {sorted(imported & assigned)}"


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


def _only_displays(loop) -> bool:
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and getattr(s.value.func, "id", "") == "display" for s in loop.body)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_loop_only_to_display(path: Path):
    """Loops over variants, and table building, live in medcomp; a cell may only loop to show results."""
    notebook = nbformat.read(str(path), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.While) or (isinstance(node, ast.For) and not _only_displays(node)):
                    raise AssertionError(f"{path.name}: a loop that computes belongs in medcomp:\n{ast.get_source_segment(cell.source, node)}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_open_with_one_call(path: Path):
    """The shared first cells are one call: parameters, then open_stage; no copied install or banner code."""
    code = [c.source for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]
    assert "parameters" in code[0] or "params_file" in code[0]
    assert f'open_stage(STAGE, params_file, run_dir' in code[1] and f'STAGE = "{path.stem}"' in code[1]
    assert not any("pip install" in source or "find_spec" in source for source in code)
