"""What a worker tells Ray Train and MLflow: `Reporter`, the one caller of ``ray.train.report`` in a worker, and
the evaluation's MLflow record (`log_evaluation`).

``ray.train.report`` is a barrier every rank must reach: a rank that skipped one would hang the others. The
`Reporter` keeps the protocol's reporting invariant (`pipelines.training.protocol`, invariant 3): every rank
reports at the same steps in the same order, reports reach Ray in step order (an evaluation scored in the
background is reported before anything reported after it), and only rank 0 attaches a checkpoint and logs.
"""

from __future__ import annotations

import functools
import tempfile
import time
from typing import Any

import ray.train

from pipelines import names
from pipelines.tracking.logger import RunLogger
from pipelines.training.background_eval import BackgroundEvaluator
from pipelines.training.checkpoint import TrainState, save_checkpoint, write_metrics
from pipelines.training.evaluation import EvalResult, Predictions
from retina.confusion import confusion_table
from retina.data.coco import LabelMap
from retina.evaluation import (
    DEFAULT_BACKEND,
    agnostic_line,
    agnostic_metrics,
    per_class_metrics,
    per_class_rows,
    per_class_table,
)


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


class Reporter:
    """Every report a worker makes: step checkpoints, evaluations scored in place, evaluations scored in the
    background (`defer`, then `flush` when the score is in). Each report first flushes a pending evaluation."""

    def __init__(self, rank: int, tracker: RunLogger, labels: LabelMap, cfg: Any, val_shards: str) -> None:
        self.rank, self.tracker, self.labels = rank, tracker, labels
        self.async_upload = cfg.run.async_upload
        self._eval_cpus, self._val_shards = cfg.train.eval_task_cpus, val_shards
        self._pending: tuple[int, int] | None = None  # (step, epoch) of an evaluation scored in the background
        self.last_checkpoint_time = time.monotonic()  # rank 0's clock: time-based step checkpoints

    @functools.cached_property
    def ground_truth(self) -> dict[str, Any]:
        """The val split's COCO ground truth (rank 0), read once, at the first evaluation."""
        from pipelines.data.shards import coco_gt_from_shards

        return coco_gt_from_shards(self._val_shards)

    @functools.cached_property
    def _evaluator(self) -> BackgroundEvaluator:
        """Rank 0's scorer of background evaluations, made at the first one."""
        return BackgroundEvaluator(self.ground_truth, list(self.labels.coco_ids), backend=DEFAULT_BACKEND,
                                   num_cpus=self._eval_cpus)  # fmt: skip

    def scored(self) -> bool:
        """Rank 0: whether the pending evaluation's score has arrived (never blocks; a vote, so all ranks flush
        at the same step)."""
        return self.rank == 0 and self._pending is not None and self._evaluator.ready()

    def checkpoint(self, metrics: dict[str, Any], state: TrainState | None, *, sync: bool = False) -> None:
        """A step checkpoint between evaluations (no val/AP: it scores below every evaluated one). `sync`: upload
        before training goes on (a preempted node may be gone any second)."""
        self.flush()
        metrics = {**metrics, names.CHECKPOINT_SCORE: names.STEP_CHECKPOINT_SCORE}
        self._report(metrics, state, async_upload=self.async_upload and not sync)

    def evaluation(self, result: EvalResult, metrics: dict[str, Any], state: TrainState | None) -> None:
        """An evaluation scored here: rank 0 logs it; every rank reports it with its checkpoint."""
        self.flush()
        if state is not None:
            state.metrics = result.metrics()
        self._report_evaluation(result, metrics, state)

    def defer(self, predictions: Predictions | None, metrics: dict[str, Any], state: TrainState | None) -> None:
        """An evaluation scored in a background Ray task: rank 0 writes the checkpoint of the evaluated weights now
        (before they change) and hands the predictions over; `flush` reports both once scored."""
        self.flush()
        step, epoch = int(metrics[names.STEP]), int(metrics[names.EPOCH])
        if self.rank == 0:
            self._evaluator.submit(step, predictions, (metrics, write_checkpoint(state)))
        self._pending = (step, epoch)

    def flush(self) -> None:
        """Report the pending background evaluation, if any (every rank at the same step; rank 0 waits for the
        score if it has not arrived)."""
        if self._pending is None:
            return
        step, epoch = self._pending
        self._pending = None
        if self.rank != 0:
            self._report_evaluation(EvalResult(None, 0, 0), {names.STEP: step, names.EPOCH: epoch}, None)
            return
        finished = self._evaluator.wait()
        metrics, directory = finished.extra
        metrics[names.VAL_SCORE_SECONDS] = finished.seconds
        write_metrics(directory, finished.result.metrics())  # what the checkpoint records as its evaluation
        self._report_evaluation(finished.result, metrics, directory)

    def _report_evaluation(self, result: EvalResult, metrics: dict[str, Any], checkpoint: Any) -> None:
        metrics = {**metrics, **result.metrics(),
                   names.CHECKPOINT_SCORE: result.metrics().get(names.VAL_AP, names.STEP_CHECKPOINT_SCORE)}  # fmt: skip
        step, epoch = int(metrics[names.STEP]), int(metrics[names.EPOCH])
        if self.rank == 0:
            log_evaluation(self.tracker, result, metrics, step, epoch, self.labels)
        self._report(metrics, checkpoint, async_upload=self.async_upload)

    def _report(self, metrics: dict[str, Any], checkpoint: TrainState | str | None, *, async_upload: bool) -> None:
        seconds = report(metrics, checkpoint, async_upload=async_upload)
        self.last_checkpoint_time = time.monotonic()
        self.tracker.log_metrics({names.CHECKPOINT_SECONDS: seconds}, int(metrics[names.STEP]))


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
    tracker.log_dict(report_json, names.EVAL_REPORT_ARTIFACT)
    tracker.log_text(confusion_table(result.confusion) + "\n", names.EVAL_CONFUSION_ARTIFACT)
    text = "\n".join([coco.report, per_class_table(per_class), agnostic_line(coco.agnostic, coco.metrics)])
    tracker.log_text(text, names.EVAL_COCOEVAL_ARTIFACT)
    if result.samples:
        # matplotlib is imported here, at the one evaluation that draws: every training worker imports this module
        # at start-up, when its ~0.3 s of CPU is on the way to the first step
        from pipelines.tracking import plots

        for sample in result.samples:
            fig = plots.detections_figure(sample, list(labels.names))
            tracker.log_figure(fig, f"{names.VAL_IMAGES_ARTIFACT_DIR}/image_{sample.image_id:06d}.png")
            plots.close(fig)
