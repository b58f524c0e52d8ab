"""The report figures at a real run's sizes: no text drawn over other text (tick labels, names at points,
legends, titles), the thing a reader's browser showed overlapping."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from medcomp import plotting  # noqa: E402
from medcomp.knowledge import DISEASES  # noqa: E402

VARIANTS = ["finetuned", "finetuned-awq", "finetuned-bnb", "finetuned-qlora", *[f"pruned-{n}" for n in (2, 4, 7, 8, 9, 10)], "pruned-7-awq",
            "pruned-7-magnitude", "recovered-7", "recovered-9", "recovered-7-magnitude", "recovered-7-awq", "recovered-7-bnb", "recovered-7-rtn",
            "recovered-9-awq", "recovered-9-bnb", "recovered-7-qlora", "recovered-7-magnitude-awq"]


def overlapping_texts(figure) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts whose drawn boxes intersect by more than a pixel each way."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip() and t.figure is figure]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    pairs = []
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > 1 and height > 1:
            pairs.append((a, b))
    return pairs


def _efficiency() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    bits = [4 if any(m in v for m in ("awq", "bnb", "rtn", "qlora")) else 16 for v in VARIANTS]
    memory = [20 + 5 * rng.random() if b == 4 else 70 + 10 * rng.random() for b in bits]  # the 4-bit variants cluster
    return pd.DataFrame({"bits": bits, "model MB": memory, "decode ms/token": 10 + 3 * rng.random(len(VARIANTS)),
                         "score": 25 + 70 * rng.random(len(VARIANTS))}, index=VARIANTS)


def _figures():
    rng = np.random.default_rng(1)
    efficiency = _efficiency()
    scores = efficiency[["score"]].assign(**{"95% CI low": efficiency["score"] - 4, "95% CI high": efficiency["score"] + 4})
    names = [d.name if hasattr(d, "name") else str(d) for d in DISEASES]
    layers = list(range(30))
    orders = {name: list(rng.permutation(range(2, 29))) for name in ("similarity", "magnitude", "block_influence", "perplexity")}
    return {
        "memory_vs_latency": lambda: plotting.memory_vs_latency(efficiency),
        "score_vs_memory": lambda: plotting.score_vs_memory(efficiency.join(scores[["95% CI low", "95% CI high"]]), ["finetuned", "recovered-7-awq"]),
        "confusion_heatmap": lambda: plotting.confusion_heatmap(pd.DataFrame(rng.integers(0, 6, (8, 9)), index=names, columns=names + ["none"])),
        "layer_similarity": lambda: plotting.layer_similarity(pd.Series(rng.random(27), index=range(2, 29)), [0, 1, 29], 30),
        "rankings_side_by_side": lambda: plotting.rankings_side_by_side(orders, layers),
        "correlation_heatmap": lambda: plotting.correlation_heatmap(pd.DataFrame(rng.uniform(-1, 1, (4, 4)), index=list(orders), columns=list(orders))),
        "scores_with_intervals": lambda: plotting.scores_with_intervals(scores),
        "decode_time_split": lambda: plotting.decode_time_split(pd.DataFrame({"layers ms/token": 8.0, "lm_head ms/token": 1.5, "rest ms/token": 0.5}, index=VARIANTS)),
    }


@pytest.mark.parametrize("name", list(_figures()))
def test_no_text_is_drawn_over_other_text(name):
    import matplotlib.pyplot as plt

    figure = _figures()[name]()
    try:
        assert overlapping_texts(figure) == []
    finally:
        plt.close(figure)


def test_the_overlap_check_sees_two_names_at_one_point():
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.annotate("recovered-7-awq", (0.5, 0.5))
    axes.annotate("recovered-7-rtn", (0.5, 0.5))
    assert overlapping_texts(figure) == [("recovered-7-awq", "recovered-7-rtn")]
    plt.close(figure)
