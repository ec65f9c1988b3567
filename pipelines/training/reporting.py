"""The end of an evaluation in a worker: rank 0 logs the evaluation to MLflow and writes the checkpoint; every rank
calls ``ray.train.report`` (a barrier: a rank that skipped it would hang the others)."""

from __future__ import annotations

import tempfile
from typing import Any

import ray.train

from pipelines.tracking import plots
from pipelines.tracking.logger import RunLogger
from pipelines.training.checkpoint import TrainState, save_checkpoint
from pipelines.training.evaluation import EvalResult
from retina.data.coco import LabelMap
from retina.evaluation import agnostic_line, agnostic_metrics, per_class_metrics, per_class_rows, per_class_table


def report(metrics: dict[str, Any], state: TrainState | None) -> None:
    """Every rank reports `metrics`; rank 0 (the one with a `state`) attaches the checkpoint it writes."""
    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as ckpt_dir:
        save_checkpoint(ckpt_dir, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))


def log_evaluation(
    tracker: RunLogger, result: EvalResult, metrics: dict[str, Any], step: int, epoch: int, labels: LabelMap
) -> None:
    """Rank 0: val metrics (also per class and class-agnostic, to MLflow only: Tune's table stays the summary),
    the evaluation report, and (at the end) a few val images with boxes."""
    coco = result.coco
    per_class = per_class_rows(coco, dict(zip(labels.coco_ids, labels.names, strict=True)))
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    extra = {**per_class_metrics(per_class, "val/"), **agnostic_metrics(coco.agnostic, "val/")}
    tracker.log_metrics({**val, **extra}, step)
    report_json = {
        "step": step,
        "epoch": epoch,
        "metrics": coco.metrics,
        "undefined_metrics": coco.undefined,
        "per_class": per_class,
        "agnostic": coco.agnostic,
        "num_images": result.num_images,
        "num_detections": result.num_detections,
    }
    tracker.log_dict(report_json, "evaluation/report.json")
    text = "\n".join([coco.report, per_class_table(per_class), agnostic_line(coco.agnostic, coco.metrics)])
    tracker.log_text(text, "evaluation/cocoeval.txt")
    for sample in result.samples:
        fig = plots.detections_figure(sample, list(labels.names))
        tracker.log_figure(fig, f"val_images/image_{sample.image_id:06d}.png")
        plots.close(fig)
