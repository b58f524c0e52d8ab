"""Figures for the reports. Each function takes plain data (a run's files) and returns a Figure."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import pandas as pd


def loss_curve(log_history: Sequence[dict[str, Any]], title: str = "QLoRA finetuning loss"):
    """Training loss against optimizer step, from ``Trainer.state.log_history``."""
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if not points:
        raise ValueError("the log history holds no training loss (was logging_steps larger than the run?)")
    steps, losses = zip(*points)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(steps, losses, marker="o", markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy on answer tokens")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion_heatmap(matrix: pd.DataFrame, title: str = "Held-out disease naming"):
    figure, axes = plt.subplots(figsize=(7, 5))
    image = axes.imshow(matrix.values, cmap="Blues")
    axes.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right")
    axes.set_yticks(range(len(matrix.index)), matrix.index)
    for (row, column), value in pd.DataFrame(matrix.values).stack().items():
        axes.text(column, row, int(value), ha="center", va="center", color="black" if value < matrix.values.max() / 2 else "white")
    axes.set_xlabel("disease named in the answer")
    axes.set_ylabel("true disease")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, shrink=0.8)
    figure.tight_layout()
    return figure
