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
    """The image drawn ~800 px wide (small images are upscaled so the labels stay readable) with the ground truth
    (green, dashed, class name inside the box's bottom-left corner) and the predictions (red, "class score" above
    the box's top-left corner): the two kinds of label never sit in the same spot."""
    h, w = sample.image.shape[:2]
    scale = 8.0 / max(h, w)  # inches per pixel: the longer side is 8 in at 100 dpi
    fig, ax = plt.subplots(figsize=(max(4.0, w * scale), max(4.0, h * scale)), dpi=100)
    ax.imshow(sample.image, interpolation="nearest")
    for (x1, y1, x2, y2), label in zip(sample.gt_boxes, sample.gt_labels, strict=True):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linestyle="--", lw=1.5))
        ax.text(x1 + 1, y2 - 1, names[int(label)], color="black", fontsize=9, va="bottom",
                bbox={"facecolor": "lime", "alpha": 0.7, "pad": 1, "edgecolor": "none"})  # fmt: skip
    for (x1, y1, x2, y2), label, score in zip(sample.pred_boxes, sample.pred_labels, sample.pred_scores, strict=True):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1.5))
        ax.text(x1, y1 - 1, f"{names[int(label)]} {score:.2f}", color="white", fontsize=9, va="bottom",
                bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "edgecolor": "none"})  # fmt: skip
    ax.set_title(f"image {sample.image_id}: true (green, dashed) and predicted (red)", fontsize=10)
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
