"""COCO evaluation of a stored model on prepared shards, logged to MLflow and linked to the model: the library
behind ``python pipelines/evaluate.py`` (its --help says what the numbers mean and where they go).

The computation is training's own (`pipelines.training.evaluation`): the val pipeline of `pipelines.data`, the
same collate, `model.predict_batch`, the COCO ground truth from the shards and the same COCOeval call.

With ``loss_gammas`` (``--loss-analysis``) a second streamed pass over the same val pipeline adds the paper's
Figure 4 (`run_loss_analysis`; report and logging in `pipelines.inference.loss_analysis`). A second pass rather
than a tap on the first: the analysis needs the anchor targets of ``classification_targets``, a forward of its
own, and the COCO pass stays exactly training's evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import s3
from cluster.connect import connect_ray
from pipelines import console, names
from pipelines.data.datasets import DecodeCpus, val_batches
from pipelines.data.shards import coco_gt_from_shards, label_map, load_manifest, settings_for, shard_index
from pipelines.inference.detector import Detector, load_model
from pipelines.inference.loss_analysis import describe, log_loss_analysis
from pipelines.tracking import store
from pipelines.training.evaluation import evaluate
from retina.analysis import LossConcentrationResult, analyse_batches
from retina.confusion import confusion_table
from retina.data.coco import DataError
from retina.evaluation import (
    METRICS,
    agnostic_line,
    agnostic_metrics,
    per_class_metrics,
    per_class_rows,
    per_class_table,
)

logger = logging.getLogger("retina.evaluate")

DEFAULT_EXPERIMENT = "retina-evaluation"


@dataclass
class Evaluation:
    metrics: dict[str, float]  # AP ... APl
    report: str  # pycocotools' summary
    undefined: list[str]
    per_class: list[dict[str, Any]]  # one {"id", "name", "AP", "AP50"} per category with ground truth
    agnostic: dict[str, float]  # class-agnostic {"AP", "AP50"}: the gap to metrics is what classification costs
    num_images: int
    num_detections: int
    batch_size: int
    model: str
    data: str
    run_id: str | None = None  # the MLflow evaluation run
    seconds: float = 0.0
    loss_analysis: LossConcentrationResult | None = None  # with --loss-analysis: the paper's Figure 4
    confusion: list[dict[str, Any]] = field(default_factory=list)  # per class: found as itself/another/missed


def _check_labels(detector: Detector, data: str) -> None:
    """The shards' categories must be the model's: otherwise label i would be scored as the wrong class."""
    manifest = load_manifest(data, settings_for(data))
    if label_map(manifest) != detector.label_map:
        raise DataError(
            f"{data}: categories {list(label_map(manifest).coco_ids)} differ from the model's "
            f"{list(detector.label_map.coco_ids)} ({detector.source.uri})"
        )


def val_batch_size(detector: Detector, override: int | None) -> int:
    """--batch-size, else the training run's data.val_batch_size (same padding → same AP), else 1."""
    if override:
        return override
    return int(detector.train_config.get("data", {}).get("val_batch_size", 1) or 1)


def checked_data(detector: Detector, data: str) -> str:
    """`data` made absolute (Ray tasks run in other directories), its categories checked against the model's."""
    if not s3.is_s3(data):
        data = str(Path(data).absolute())
    _check_labels(detector, data)
    return data


def shard_batches(detector: Detector, data: str, batch_size: int) -> Iterable[dict[str, Any]]:
    """The shards' images through training's val pipeline (decode tasks on Ray, resize to the model's input size,
    collate), in shard order, `batch_size` images padded together."""
    import ray

    cpus = DecodeCpus(max(1.0, ray.available_resources().get("CPU", 1.0)))  # as many tasks as CPUs are free
    return val_batches(shard_index(data), detector.cfg.input, batch_size, cpus, s3_settings=settings_for(data))


def run_evaluation(detector: Detector, data: str, batch_size: int) -> Evaluation:
    """Predict every image of the shards (streamed through Ray Data) and score with COCOeval."""
    started = time.time()
    data = checked_data(detector, data)
    names = dict(zip(detector.label_map.coco_ids, detector.label_map.names, strict=True))
    result = evaluate(  # training's evaluation function, on the driver: one consumer, rows in shard order
        detector.model,
        shard_batches(detector, data, batch_size),
        coco_ids=list(detector.label_map.coco_ids),
        load_gt=lambda: coco_gt_from_shards(data),
        device=detector.device,
    )
    return Evaluation(
        metrics=dict(result.coco.metrics),
        report=result.coco.report,
        undefined=list(result.coco.undefined),
        per_class=per_class_rows(result.coco, names),
        agnostic=dict(result.coco.agnostic),
        num_images=result.num_images,
        num_detections=result.num_detections,
        batch_size=batch_size,
        model=detector.source.describe(),
        data=data,
        seconds=time.time() - started,
        confusion=result.confusion,
    )


def run_loss_analysis(
    detector: Detector, data: str, batch_size: int, gammas: Sequence[float]
) -> LossConcentrationResult:
    """The paper's Figure 4 for the model on the shards at `data`: every val image through the same pipeline as
    `run_evaluation`, the class outputs in fp32 (as the AP sees them), α the model's own. Streamed: memory is
    one batch plus fixed histograms."""
    data = checked_data(detector, data)
    return analyse_batches(detector.model, shard_batches(detector, data, batch_size), gammas, detector.device)


def _experiment_id(client: Any, detector: Detector, name: str | None) -> str:
    if not name and detector.source.run_id:
        try:
            return client.get_run(detector.source.run_id).info.experiment_id
        except Exception:  # the training run lives in another store, or was deleted
            logger.info("training run %s not found; using experiment %s", detector.source.run_id, DEFAULT_EXPERIMENT)
    name = name or DEFAULT_EXPERIMENT
    return store.experiment_id(client, name)


def log_evaluation(detector: Detector, evaluation: Evaluation, tracking_uri: str, experiment: str | None) -> str:
    """A new MLflow run with the metrics and report; metrics linked to the LoggedModel; version tags set."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import log_metric_batch, tracked_run

    src = detector.source
    client = MlflowClient(tracking_uri)
    run = client.create_run(
        _experiment_id(client, detector, experiment),
        run_name=f"evaluate {src.registered_name}-v{src.version}" if src.registered_name else "evaluate",
        tags={
            names.TASK_TAG: names.EVALUATION_TASK,
            names.MODEL_URI_TAG: src.uri,
            names.MODEL_LOAD_URI_TAG: src.load_uri,
            **({names.TRAINING_RUN_ID_TAG: src.run_id} if src.run_id else {}),
        },
    )
    run_id = run.info.run_id
    with tracked_run(tracking_uri, run_id):
        now = int(time.time() * 1000)
        params = {
            "model": src.uri,
            "data": evaluation.data,
            "batch_size": evaluation.batch_size,
            "num_images": evaluation.num_images,
        }
        metrics = [
            Metric(f"{names.EVAL_PREFIX}{k}", float(v), now, 0, model_id=src.model_id)
            for k, v in evaluation.metrics.items()
        ]
        extra = {
            **per_class_metrics(evaluation.per_class, names.EVAL_PREFIX),
            **agnostic_metrics(evaluation.agnostic, names.EVAL_PREFIX),
        }
        metrics += [Metric(k, v, now, 0) for k, v in extra.items()]
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        log_metric_batch(client, run_id, metrics)
        report = {k: v for k, v in evaluation.__dict__.items() if k not in ("report", "run_id", "loss_analysis")}
        client.log_dict(run_id, report, names.EVAL_REPORT_ARTIFACT)
        text = "\n".join([evaluation.report, agnostic_line(evaluation.agnostic, evaluation.metrics),
                          confusion_table(evaluation.confusion)])  # fmt: skip
        client.log_text(run_id, text, names.EVAL_COCOEVAL_ARTIFACT)
        if evaluation.loss_analysis is not None:
            log_loss_analysis(client, run_id, evaluation.loss_analysis)
        if src.registered_name and src.version:
            for k, v in evaluation.metrics.items():
                client.set_model_version_tag(
                    src.registered_name, src.version, f"{names.EVAL_PREFIX}{k}", repr(float(v))
                )
            client.set_model_version_tag(src.registered_name, src.version, names.VERSION_EVAL_RUN_ID_TAG, run_id)
            client.set_model_version_tag(src.registered_name, src.version, names.VERSION_EVAL_DATA_TAG, evaluation.data)
    return run_id


def evaluate_model(
    model: str,
    data: str,
    *,
    batch_size: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log: bool = True,
    loss_gammas: Sequence[float] | None = None,
) -> Evaluation:
    """Load `model`, evaluate on the shards at `data`, log to MLflow (unless log=False). With `loss_gammas`
    also the loss concentration at those γ (`Evaluation.loss_analysis`), logged into the same run."""
    from pipelines.tracking.store import resolve_tracking_uri

    detector = load_model(model, tracking_uri=tracking_uri)
    connect_ray(dashboard=False, log_to_driver=console.is_verbose())
    size = val_batch_size(detector, batch_size)
    evaluation = run_evaluation(detector, data, size)
    if loss_gammas is not None:
        evaluation.loss_analysis = run_loss_analysis(detector, data, size, loss_gammas)
    if log:
        uri = detector.source.tracking_uri or resolve_tracking_uri(tracking_uri or "")
        evaluation.run_id = log_evaluation(detector, evaluation, uri, experiment)
    return evaluation


def format_table(evaluation: Evaluation) -> str:
    lines = [
        f"COCO box AP of {evaluation.model} on {evaluation.data} ({evaluation.num_images} images, "
        f"{evaluation.num_detections} detections, batch size {evaluation.batch_size})",
        "  metric   value",
    ]
    for name in METRICS:
        note = "  (no ground truth in range)" if name in evaluation.undefined else ""
        lines.append(f"  {name:<7}  {evaluation.metrics[name]:.4f}{note}")
    if evaluation.per_class:
        lines.append(per_class_table(evaluation.per_class))
    if evaluation.agnostic:
        lines.append(agnostic_line(evaluation.agnostic, evaluation.metrics))
    if evaluation.confusion:
        lines += [
            "  how each class's objects were detected (IoU >= 0.5, score >= 0.3):",
            confusion_table(evaluation.confusion),
        ]
    if evaluation.loss_analysis is not None:
        lines.append(describe(evaluation.loss_analysis))
    if evaluation.run_id:
        lines.append(f"  logged to MLflow run {evaluation.run_id}")
    return "\n".join(lines)
