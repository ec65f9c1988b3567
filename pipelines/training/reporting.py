"""The end of an evaluation in a worker: rank 0 logs the evaluation to MLflow and writes the checkpoint; every rank
calls ``ray.train.report`` (a barrier: a rank that skipped it would hang the others)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import ray.train

from pipelines.tracking.logger import RunLogger
from pipelines.training.checkpoint import TrainState, save_checkpoint
from pipelines.training.evaluation import EvalResult
from retina.confusion import confusion_table
from retina.data.coco import LabelMap
from retina.evaluation import agnostic_line, agnostic_metrics, per_class_metrics, per_class_rows, per_class_table


def write_checkpoint(state: TrainState) -> str:
    """Write `state` into a new local directory for `report` (rank 0)."""
    # Not a TemporaryDirectory: an asynchronous upload reads it after `report` returns; Ray deletes it.
    directory = tempfile.mkdtemp(prefix="retina-checkpoint-")
    save_checkpoint(directory, state)
    return directory


def report(metrics: dict[str, Any], checkpoint: TrainState | str | None, *, async_upload: bool) -> float:
    """Every rank reports `metrics`; rank 0 attaches the checkpoint: a `TrainState` it writes now, or a directory
    `write_checkpoint` wrote earlier (a background evaluation's, written at the evaluated step).

    With `async_upload` the copy to storage runs in Ray's background thread: the ranks wait (at the report's
    barrier) only for rank 0's local write. Ray registers the checkpoint, i.e. makes it the one a restart
    resumes from, only after its upload finished, so a half-uploaded checkpoint is never taken as the latest.
    Returns the seconds this call took (the stall it caused on this rank)."""
    start = time.perf_counter()
    mode = ray.train.CheckpointUploadMode.ASYNC if async_upload else ray.train.CheckpointUploadMode.SYNC
    if checkpoint is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=mode)
        return time.perf_counter() - start
    directory = checkpoint if isinstance(checkpoint, str) else write_checkpoint(checkpoint)
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )
    return time.perf_counter() - start


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
        "confusion": result.confusion,
    }
    tracker.log_dict(report_json, "evaluation/report.json")
    tracker.log_text(confusion_table(result.confusion) + "\n", "evaluation/confusion.txt")
    text = "\n".join([coco.report, per_class_table(per_class), agnostic_line(coco.agnostic, coco.metrics)])
    tracker.log_text(text, "evaluation/cocoeval.txt")
    if result.samples:
        # matplotlib is imported here, at the one evaluation that draws: every training worker imports this module
        # at start-up, when its ~0.3 s of CPU is on the way to the first step
        from pipelines.tracking import plots

        for sample in result.samples:
            fig = plots.detections_figure(sample, list(labels.names))
            tracker.log_figure(fig, f"val_images/image_{sample.image_id:06d}.png")
            plots.close(fig)
