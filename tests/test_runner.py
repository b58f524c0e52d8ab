import nbformat

from medcomp.runner import tidy_streams


def test_reports_show_progress_bars_as_a_terminal_would():
    cell = nbformat.v4.new_code_cell("train()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="steps:   0%|  | 0/2\r"),
        nbformat.v4.new_output("stream", name="stderr", text="steps:  50%|# | 1/2\r"),
        nbformat.v4.new_output("stream", name="stderr", text="steps: 100%|##| 2/2\n"),
        nbformat.v4.new_output("stream", name="stdout", text="loss 0.5\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "figure"}),
        nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
    ]
    notebook = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell("text")])
    outputs = tidy_streams(notebook).cells[0].outputs
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outputs] == [
        ("stream", "stderr", "steps: 100%|##| 2/2\n"),
        ("stream", "stdout", "loss 0.5\n"),
        ("display_data", None, None),
        ("stream", "stderr", "a warning\n"),
    ]
