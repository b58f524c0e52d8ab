"""Figures for the reports. Each function takes plain data (a run's files) and returns a Figure."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd


def loss_curve(log_history: Sequence[dict[str, Any]], title: str = "QLoRA finetuning loss"):
    """Training loss against optimizer step, from ``Trainer.state.log_history``."""
    return loss_curves({"": log_history}, title)


def loss_curves(histories: dict[str, Sequence[dict[str, Any]]], title: str = "QLoRA finetuning loss",
                ylabel: str = "cross-entropy on answer tokens", log_scale: bool = False):
    """One training-loss curve per named ``Trainer.state.log_history``, on shared axes."""
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, log_history in histories.items():
        points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
        if not points:
            raise ValueError(f"the log history{' of ' + name if name else ''} holds no training loss (was logging_steps larger than the run?)")
        steps, losses = zip(*points)
        axes.plot(steps, losses, marker="o", markersize=3, label=name or None)
    if any(histories):
        axes.legend()
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    if log_scale:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


# Where a point's name may go, in points from the point: beside it first, then around it, then further out.
_LABEL_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3) for dx, dy in ((4, 3), (4, -9), (-4, 3), (-4, -9), (0, 8), (0, -14), (8, -3), (-8, -3))]


def _label_points(figure, axes, names: Sequence[str], xs: Sequence[float], ys: Sequence[float]) -> None:
    """Each point's name where it overlaps no name placed before it (tried at ``_LABEL_OFFSETS``). Points whose
    name fits nowhere (a cluster: every 4-bit variant at one size) get a number, and a key beside the axes names
    them, so no label is drawn over another."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    placed, unplaced = [], []
    for name, x, y in zip(names, xs, ys):
        for dx, dy in _LABEL_OFFSETS:
            label = axes.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points", ha="left" if dx >= 0 else "right")
            box = label.get_window_extent(renderer)
            if axes.get_window_extent(renderer).contains(box.x0, box.y0) and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()
        else:
            unplaced.append((name, x, y))
    for number, (name, x, y) in enumerate(unplaced, start=1):
        axes.annotate(str(number), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color="tab:red")
    if unplaced:
        axes.text(1.02, 1.0, "\n".join(f"{number}: {name}" for number, (name, _, _) in enumerate(unplaced, start=1)), transform=axes.transAxes,
                  fontsize=7, va="top", ha="left", color="tab:red")


def confusion_heatmap(matrix: pd.DataFrame, title: str = "Held-out disease naming"):
    figure, axes = plt.subplots(figsize=(7, 5))
    image = axes.imshow(matrix.values, cmap="Blues")
    axes.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=90)  # upright names never run into each other; slanted ones did
    axes.set_yticks(range(len(matrix.index)), matrix.index)
    for (row, column), value in pd.DataFrame(matrix.values).stack().items():
        axes.text(column, row, int(value), ha="center", va="center", color="black" if value < matrix.values.max() / 2 else "white")
    axes.set_xlabel("disease named in the answer")
    axes.set_ylabel("true disease")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    return figure


def layer_similarity(similarity: pd.Series, protected: Sequence[int], num_layers: int, title: str = "Figure 3 · similarity after removing one block"):
    """The paper's Figure 3: mean answer similarity (Eq. 5) with each block removed; protected blocks marked."""
    figure, axes = plt.subplots(figsize=(9, 3.6))
    axes.bar(similarity.index, similarity.values, color="#4c72b0", label="removable block")
    for layer in protected:
        axes.axvspan(layer - 0.45, layer + 0.45, color="#bbbbbb", alpha=0.6, hatch="//", lw=0)
    axes.bar([], [], color="#bbbbbb", hatch="//", label="protected (never removed)")
    axes.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=7)
    axes.set_xlim(-0.6, num_layers - 0.4)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("decoder block removed (0-based)")
    axes.set_ylabel("mean cosine similarity of answers")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def rankings_side_by_side(orders: dict[str, Sequence[int]], layers: Sequence[int], title: str = "Removal order by criterion (1 = removed first)"):
    """Each criterion's rank of every removable block, one line per criterion."""
    figure, axes = plt.subplots(figsize=(9, 3.6))
    for name, order in orders.items():
        position = {layer: rank for rank, layer in enumerate(order, start=1)}
        xs = [layer for layer in layers if layer in position]
        axes.plot(xs, [position[layer] for layer in xs], marker="o", markersize=3, label=name)
    ranks = max((len(order) for order in orders.values()), default=1)
    axes.set_ylim(ranks + 1.5, 0)  # rank 1 on top; the last rank kept off the corner where block 0's label sits
    axes.set_yticks([1] + list(range(5, ranks + 1, 5)))
    axes.set_xlabel("decoder block (0-based)")
    axes.set_ylabel("rank")
    axes.set_title(title)
    axes.legend(fontsize=8, ncol=3)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def correlation_heatmap(matrix: pd.DataFrame, title: str = "Spearman rank correlation between criteria"):
    figure, axes = plt.subplots(figsize=(5, 4))
    image = axes.imshow(matrix.values.astype(float), cmap="RdBu", vmin=-1, vmax=1)
    axes.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=90)
    axes.set_yticks(range(len(matrix.index)), matrix.index)
    for (row, column), value in pd.DataFrame(matrix.values.astype(float)).stack().items():
        axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    return figure


def _wrap(text: str, width: int = 38, lines: int = 5) -> str:
    import textwrap

    wrapped = textwrap.wrap(text or "(empty)", width)
    return "\n".join(wrapped[:lines]) + (" …" if len(wrapped) > lines else "")


def prune_one_block_workflow(num_layers: int, cases: Sequence[dict[str, Any]], question: str,
                             title: str = "Figure 2 · prune one block, answer, compare"):
    """The paper's Figure 2 drawn from this run: per case, the block stack with the removed block
    crossed out, the unpruned and pruned answers, and the similarity the criterion scored.

    Each case: ``{"layer", "unpruned", "pruned", "similarity", "mean_similarity"}``.
    """
    from matplotlib.patches import Rectangle

    figure, panels = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 5.2))
    panels = [panels] if len(cases) == 1 else list(panels)
    for axes, case in zip(panels, cases):
        axes.set_xlim(0, 10)
        axes.set_ylim(-1.5, num_layers + 3.5)
        axes.axis("off")
        height = 1.0
        for layer in range(num_layers):
            removed = layer == case["layer"]
            axes.add_patch(Rectangle((0.3, layer), 2.2, height * 0.85, facecolor="#f4cccc" if removed else "#dbe5f1",
                                     edgecolor="#c00000" if removed else "#4c72b0", lw=1.2 if removed else 0.6))
            if removed:
                axes.plot([0.3, 2.5], [layer, layer + 0.85], color="#c00000", lw=1.5)
                axes.plot([0.3, 2.5], [layer + 0.85, layer], color="#c00000", lw=1.5)
                axes.text(2.7, layer + 0.4, f"block {layer} removed", color="#c00000", va="center", fontsize=9)
        axes.text(1.4, -1.0, "image + question", ha="center", fontsize=8)
        axes.text(1.4, num_layers + 0.3, "answer", ha="center", fontsize=8)
        axes.text(4.2, num_layers + 2.6, f"Q: {question}", fontsize=8, style="italic")
        axes.text(4.2, num_layers * 0.62, "unpruned:\n" + _wrap(case["unpruned"]), fontsize=8, va="center",
                  bbox={"facecolor": "#eef5ee", "edgecolor": "#88aa88"})
        axes.text(4.2, num_layers * 0.22, f"without block {case['layer']}:\n" + _wrap(case["pruned"]), fontsize=8, va="center",
                  bbox={"facecolor": "#fbeeee", "edgecolor": "#cc8888"})
        axes.text(4.2, -1.0, f"cosine similarity (MiniLM) {case['similarity']:.2f}; block mean S_avg = {case['mean_similarity']:.2f}",
                  fontsize=9, weight="bold")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _image_beside_question(image_path: str, question: str, height: float):
    """A figure with the case's image on the left and a text panel, headed by the question, on the right."""
    from PIL import Image

    figure = plt.figure(figsize=(11, height))
    image_axes = figure.add_axes([0.01, 0.55, 0.14, 0.4])
    image_axes.imshow(Image.open(image_path))
    image_axes.axis("off")
    text_axes = figure.add_axes([0.17, 0.0, 0.82, 1.0])
    text_axes.axis("off")
    text_axes.text(0, 0.97, f"Q: {question}", fontsize=9, style="italic", va="top")
    return figure, text_axes


def answers_at_levels(image_path: str, question: str, answers: dict[str, str], title: str = "Figure B2 · one question at every pruning level"):
    """The paper's Figure B2: one image and question, answered by each pruning level."""
    figure, text_axes = _image_beside_question(image_path, question, 1.2 + 0.9 * len(answers))
    step = 0.9 / max(1, len(answers))
    for row, (level, answer) in enumerate(answers.items()):
        text_axes.text(0, 0.9 - row * step, f"{level}:", fontsize=9, weight="bold", va="top")
        text_axes.text(0.16, 0.9 - row * step, _wrap(answer, 110, 2), fontsize=8, va="top")
    figure.suptitle(title, x=0.5, y=1.02)
    return figure


def activation_outliers(q_proj_output, input_channel_magnitude, layer: int, num_layers: int, outlier_sigmas: float = 6.0,
                        title: str = "Figure 4 · q_proj activations on calibration data"):
    """Left: the distribution of a decoder layer's ``q_proj`` output values (log count), values beyond
    ``outlier_sigmas`` standard deviations marked. Right: the per-input-channel mean magnitude AWQ
    scales by, sorted, the top 1 % (AWQ's salient channels) marked."""
    import numpy as np

    values = q_proj_output.flatten().numpy()
    limit = outlier_sigmas * values.std()
    outliers = np.abs(values - values.mean()) > limit
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.hist(values, bins=200, log=True, color="tab:blue")
    left.hist(values[outliers], bins=200, log=True, color="tab:red", label=f"beyond {outlier_sigmas:g}σ: {outliers.mean():.2%} of values")
    left.set_xlabel(f"q_proj output value (decoder layer {layer + 1} of {num_layers})")
    left.set_ylabel("count (log)")
    left.legend()
    magnitude = np.sort(input_channel_magnitude.numpy())[::-1]
    salient = max(1, len(magnitude) // 100)
    right.bar(range(len(magnitude)), magnitude, width=1.0, color="tab:gray")
    right.bar(range(salient), magnitude[:salient], width=1.0, color="tab:red", label=f"top 1 % ({salient} channels)")
    right.set_yscale("log")
    right.set_xlabel("input channel, sorted by mean |x|")
    right.set_ylabel("mean |x| over calibration tokens")
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def survival_by_layer(frames: dict[str, pd.DataFrame], title: str = "Share of the SFT's weight change kept after quantization"):
    """Median ``kept`` per decoder layer, one line per quantized variant (see ``quantization.finetune_survival``)."""
    figure, axes = plt.subplots(figsize=(7, 3.6))
    for name, frame in frames.items():
        per_layer = frame.groupby("layer")["kept"].median()
        axes.plot(per_layer.index + 1, per_layer.values, marker="o", markersize=3, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("kept (1 = all of it)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def memory_vs_latency(table: pd.DataFrame, memory: str = "model MB", latency: str = "decode ms/token",
                      title: str = "Memory against decode latency, every variant"):
    """One point per variant (``benchmark.efficiency_table``), coloured by bit width."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for bits, group in table.groupby("bits"):
        axes.scatter(group[memory], group[latency], s=30, label=f"{bits}-bit")
    axes.set_xlabel(memory)
    axes.set_ylabel(f"{latency} (median)")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _label_points(figure, axes, list(table.index), list(table[memory]), list(table[latency]))
    return figure


def decode_time_split(table: pd.DataFrame, title: str = "Where a decoded token's time goes"):
    """Stacked bars per variant: decoder layers, lm_head and the rest, ms per decoded token."""
    parts = ["layers ms/token", "lm_head ms/token", "rest ms/token"]
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(table) + 1.5))
    left = pd.Series(0.0, index=table.index)
    for part, colour in zip(parts, ["tab:blue", "tab:orange", "tab:gray"]):
        axes.barh(table.index, table[part], left=left, color=colour, label=part.replace(" ms/token", ""))
        left = left + table[part]
    axes.invert_yaxis()
    axes.set_xlabel("ms per decoded token (hooked run)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def scores_with_intervals(table: pd.DataFrame, title: str = "Judge score per variant (95 % bootstrap interval)"):
    """Horizontal bars of ``score`` with ``95% CI low``/``high`` error bars (``scoring.score_table``)."""
    figure, axes = plt.subplots(figsize=(8, 0.3 * len(table) + 1.5))
    errors = [table["score"] - table["95% CI low"], table["95% CI high"] - table["score"]]
    axes.barh(table.index, table["score"], xerr=errors, color="tab:blue", alpha=0.8, capsize=2)
    axes.axvline(25, color="black", linewidth=0.8, linestyle=":")
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("score = 100 · mean rating / 4 (25 = every answer rated 1)")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def score_vs_memory(points: pd.DataFrame, front: Sequence[str], memory: str = "model MB",
                    title: str = "Score against memory; the Pareto front joined"):
    """Score (with interval) against memory per variant, the non-dominated variants joined by a line."""
    figure, axes = plt.subplots(figsize=(8, 5))
    errors = [points["score"] - points["95% CI low"], points["95% CI high"] - points["score"]]
    axes.errorbar(points[memory], points["score"], yerr=errors, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=2, markersize=4)
    frontier = points.loc[list(front)].sort_values(memory)
    axes.plot(frontier[memory], frontier["score"], color="tab:red", marker="o", label="Pareto front")
    axes.set_xlabel(memory)
    axes.set_ylabel("score")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    _label_points(figure, axes, list(points.index), list(points[memory]), list(points["score"]))
    return figure


def case_study(image_path: str, question: str, reference: str, answers: dict[str, tuple[str, int | None]],
               title: str = "Figure 5 · one case across compression stages"):
    """The paper's Figure 5: one image and question, the reference, and each stage's answer with its rating."""
    figure, text_axes = _image_beside_question(image_path, question, 2.0 + 1.1 * len(answers))
    text_axes.text(0, 0.89, "Reference: " + _wrap(reference, 110, 2), fontsize=8, va="top", color="tab:green")
    step = 0.75 / max(1, len(answers))
    for row, (stage, (answer, rating)) in enumerate(answers.items()):
        y = 0.75 - row * step
        text_axes.text(0, y, f"{stage}\nrating {rating if rating is not None else '—'}/4", fontsize=8, weight="bold", va="top")
        text_axes.text(0.33, y, _wrap(answer, 85, 3), fontsize=8, va="top")
    figure.suptitle(title, x=0.5, y=1.02)
    return figure


def frontier(points: pd.DataFrame, paper_points: pd.DataFrame, fronts: dict[str, Sequence[str]], beyond_stage: str = "08_beyond",
             title: str = "Score against bytes and decode time, as ratios to the finetuned model"):
    """Two panels, score × finetuned against model bytes × and decode time × finetuned: every variant of the run
    (with its interval; 08's in red), the non-dominated ones (``fronts``, per x column) joined, and the paper's
    Table 4 rows as ratios."""
    figure, panels = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axes, x, label in zip(panels, ("model MB × finetuned", "decode × finetuned"), ("model bytes × finetuned (paper: VRAM)", "decode ms/token × finetuned")):
        ours = points["stage"] == beyond_stage
        for mask, colour, name in ((~ours, "tab:blue", "this run (paper's pipeline)"), (ours, "tab:red", "this run, 08 (beyond the paper)")):
            part = points[mask]
            axes.errorbar(part[x], part["score × finetuned"], yerr=[part["score × finetuned"] - part["low"], part["high"] - part["score × finetuned"]],
                          fmt="o", color=colour, ecolor="tab:gray", capsize=2, markersize=5, label=name)
        line = points.loc[list(fronts[x])].sort_values(x)
        axes.plot(line[x], line["score × finetuned"], color="tab:green", alpha=0.6, label="Pareto front")
        axes.scatter(paper_points[x], paper_points["score × finetuned"], marker="s", color="black", label="paper, Table 4 (ratios to its original)")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
        _label_points(figure, axes, list(points.index) + list(paper_points.index), list(points[x]) + list(paper_points[x]),
                      list(points["score × finetuned"]) + list(paper_points["score × finetuned"]))
    panels[0].set_ylabel("score × finetuned")
    panels[0].legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure

