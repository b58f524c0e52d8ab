import nbformat

from medcomp.runner import tidy_streams


def test_reports_show_progress_bars_as_a_terminal_would():
    """One bar as it ended (a terminal's last redraw), moved to stdout: a finished bar is a result, and stderr is
    drawn as an error box. A warning stays on stderr; a stderr that held only a bar's newline is dropped."""
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="steps:   0%|  | 0/2\r"),
        nbformat.v4.new_output("stream", name="stderr", text="steps:  50%|# | 1/2\r"),
        nbformat.v4.new_output("stream", name="stderr", text="steps: 100%|##| 2/2\n"),
        nbformat.v4.new_output("stream", name="stdout", text="loss 0.5\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "figure"}),
        nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\n"),
    ]
    notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("text")])
    outputs = tidy_streams(notebook).cells[0].outputs
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outputs] == [
        ("stream", "stdout", "steps: 100%|##| 2/2\n"),
        ("stream", "stdout", "loss 0.5\n"),
        ("display_data", None, None),
        ("stream", "stderr", "a warning\n"),
        ("stream", "stdout", "done\n"),
    ]


def _tiny_notebook(path, body: str) -> None:
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    notebook.cells = [nbformat.v4.new_markdown_cell("# a stage\n## Work"),
                      nbformat.v4.new_code_cell('params_file = "auto"\nrun_dir = None', metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell(body)]
    nbformat.write(notebook, str(path))


def test_stage_reuse_is_never_stale(tmp_path, monkeypatch):
    """A stage is reused only if its params, notebook, the medcomp source and every earlier stage are unchanged."""
    from medcomp import runner
    from medcomp.params import PRESETS_DIR

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _tiny_notebook(notebooks / "01_first.ipynb", "print('first')")
    _tiny_notebook(notebooks / "02_second.ipynb", "print('second')")
    params = tmp_path / "p.yaml"
    params.write_text((PRESETS_DIR / "embedded.yaml").read_text())
    run_dir = tmp_path / "run"

    def run(**kwargs):
        outcomes = runner.run_pipeline(params, run_dir=run_dir, notebooks_dir=notebooks, **kwargs)
        return [(o.status, o.reason) for o in outcomes]

    assert run() == [("ok", "never ran"), ("ok", "never ran")]
    assert run() == [("reused", "nothing it depends on changed")] * 2
    _tiny_notebook(notebooks / "01_first.ipynb", "print('first, changed')")
    assert run() == [("ok", "its notebook changed"), ("ok", "an earlier stage was redone (01_first)")]
    # Redone by --only: the later stage is stale now, and the next full run redoes it.
    assert run(only=["01_first"]) == [("ok", "redone by --only"), ("stale", "not run now; an earlier stage was redone (01_first)")]
    assert run() == [("reused", "nothing it depends on changed"), ("ok", "an earlier stage was redone (01_first)")]
    monkeypatch.setattr(runner, "package_fingerprint", lambda: "other source")
    assert [status for status, _ in run()] == ["ok", "ok"] and run()[0][0] == "reused"
    params.write_text(params.read_text().replace("seed: 0\nmodel:", "seed: 1\nmodel:"))
    assert run() == [("ok", "its params changed")] * 2
    index = (run_dir / "index.html").read_text()
    assert index.count("why it ran: its params changed") == 2
    assert run() == [("reused", "nothing it depends on changed")] * 2
    index = (run_dir / "index.html").read_text()
    assert "why it ran" not in index and index.count("nothing it depends on changed") == 2


def test_the_index_opens_with_the_headline_a_stage_wrote(tmp_path):
    from medcomp import runner
    from medcomp.params import load_params
    from medcomp.runs import Run

    run = Run(tmp_path / "run")
    run.write_headline("07_judge", "<div class='headline'><h2>Headline</h2><p>Table 4 in short</p></div>")
    outcomes = [runner.StageOutcome("06_benchmark", "ok", 1.0, "06_benchmark.html"), runner.StageOutcome("07_judge", "reused", 2.0, "07_judge.html")]
    index = runner.write_index(run.directory, load_params("embedded"), outcomes).read_text()
    assert index.index("Table 4 in short") < index.index("<h2>Notebooks</h2>") < index.index("06_benchmark.html")
    failed = [runner.StageOutcome("07_judge", "not run", 0.0, None)]
    assert "Table 4 in short" not in runner.write_index(run.directory, load_params("embedded"), failed).read_text()
