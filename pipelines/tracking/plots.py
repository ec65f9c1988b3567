"""Pictures for MLflow: val images with predicted and true boxes, loss and AP curves (matplotlib Agg, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

if TYPE_CHECKING:
    from pipelines.training.evaluation import VisualSample


def detections_figure(sample: VisualSample, names: Sequence[str]) -> Figure:
    """The image with ground truth (green, dashed) and predictions (red, with class and score)."""
    h, w = sample.image.shape[:2]
    fig, ax = plt.subplots(figsize=(max(3.0, w / 80), max(3.0, h / 80)), dpi=100)
    ax.imshow(sample.image)
    for x1, y1, x2, y2 in sample.gt_boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linestyle="--", lw=1.2))
    for (x1, y1, x2, y2), label, score in zip(sample.pred_boxes, sample.pred_labels, sample.pred_scores, strict=True):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1.2))
        ax.text(x1, y1, f"{names[int(label)]} {score:.2f}", color="white", fontsize=6, va="bottom",
                bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "edgecolor": "none"})  # fmt: skip
    ax.set_title(f"image {sample.image_id}: true (green, dashed) vs predicted (red)", fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    return fig


def curves_figure(series: Mapping[str, Sequence[tuple[int, float]]], title: str, ylabel: str) -> Figure:
    """One line per metric: (step, value) pairs."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in series.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
