"""COCO evaluation of a trained model on prepared shards: AP table printed, logged to MLflow, linked to the model.

    python pipelines/evaluate.py --model models:/retinanet@champion --data data/sample/shards/val
                                 [--batch-size N] [--experiment NAME] [--no-log]

The computation is training's own (pipelines/evaluation_loop.py): the val pipeline of pipelines/data.py (same
decode, same resize, rows in shard order), the same collate, `model.predict_batch`, the COCO ground truth from
the shards and the same COCOeval call. With the training run's ``data.val_batch_size`` (the default, read from
the model's config.json) the images are also padded together exactly as in training's evaluation, so the AP
equals the ``val/AP`` training reported for that model. (Padding matters: the conv borders and GroupNorm
statistics see the padded area, so a different batch composition shifts scores in the last digits.)

MLflow: a new run ("evaluate <model>") in --experiment (default: the experiment of the training run, else
``retina-evaluation``) with the metrics ``eval/AP`` ... and the report (JSON + pycocotools' summary) as
artifacts. The metrics are also attached to the MLflow 3 LoggedModel (``model_id``), and a registered version
gets the tags ``eval/AP`` ..., ``eval/run_id`` and ``eval/data``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/evaluate.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from cluster import s3  # noqa: E402
from pipelines import cli  # noqa: E402
from pipelines.data import build_dataset, coco_gt_from_shards, label_map, load_manifest, make_collate_fn  # noqa: E402
from pipelines.evaluation_loop import evaluate  # noqa: E402
from pipelines.inference import Detector, ModelLoadError, load_model  # noqa: E402
from retina.data.coco import DataError  # noqa: E402
from retina.evaluation import (  # noqa: E402
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


def _check_labels(detector: Detector, data: str) -> None:
    """The shards' categories must be the model's: otherwise label i would be scored as the wrong class."""
    manifest = load_manifest(data, s3.S3Settings.from_env() if s3.is_s3(data) else None)
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


def run_evaluation(detector: Detector, data: str, batch_size: int) -> Evaluation:
    """Predict every image of the shards (streamed through Ray Data) and score with COCOeval."""
    started = time.time()
    if not s3.is_s3(data):
        data = str(Path(data).absolute())  # Ray tasks run in other directories
    _check_labels(detector, data)
    inp = detector.cfg.input
    names = dict(zip(detector.label_map.coco_ids, detector.label_map.names, strict=True))
    ds = build_dataset(data, train=False, min_sizes=[inp.min_size], max_size=inp.max_size)
    result = evaluate(  # training's evaluation function, on the driver: one consumer, rows in shard order
        detector.model,
        ds.iter_torch_batches(batch_size=batch_size, collate_fn=make_collate_fn(inp)),
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
    )


def _experiment_id(client: Any, detector: Detector, name: str | None) -> str:
    if not name and detector.source.run_id:
        try:
            return client.get_run(detector.source.run_id).info.experiment_id
        except Exception:  # the training run lives in another store, or was deleted
            logger.info("training run %s not found; using experiment %s", detector.source.run_id, DEFAULT_EXPERIMENT)
    name = name or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def log_evaluation(detector: Detector, evaluation: Evaluation, tracking_uri: str, experiment: str | None) -> str:
    """A new MLflow run with the metrics and report; metrics linked to the LoggedModel; version tags set."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import log_metric_batch

    src = detector.source
    client = MlflowClient(tracking_uri)
    run = client.create_run(
        _experiment_id(client, detector, experiment),
        run_name=f"evaluate {src.registered_name}-v{src.version}" if src.registered_name else "evaluate",
        tags={
            "retina.task": "evaluation",
            "retina.model_uri": src.uri,
            "retina.model_load_uri": src.load_uri,
            **({"retina.training_run_id": src.run_id} if src.run_id else {}),
        },
    )
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = {
            "model": src.uri,
            "data": evaluation.data,
            "batch_size": evaluation.batch_size,
            "num_images": evaluation.num_images,
        }
        metrics = [Metric(f"eval/{k}", float(v), now, 0, model_id=src.model_id) for k, v in evaluation.metrics.items()]
        extra = {**per_class_metrics(evaluation.per_class, "eval/"), **agnostic_metrics(evaluation.agnostic, "eval/")}
        metrics += [Metric(k, v, now, 0) for k, v in extra.items()]
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        log_metric_batch(client, run_id, metrics)
        report = {k: v for k, v in evaluation.__dict__.items() if k not in ("report", "run_id")}
        client.log_dict(run_id, report, "evaluation/report.json")
        text = "\n".join([evaluation.report, agnostic_line(evaluation.agnostic, evaluation.metrics)])
        client.log_text(run_id, text, "evaluation/cocoeval.txt")
        if src.registered_name and src.version:
            for k, v in evaluation.metrics.items():
                client.set_model_version_tag(src.registered_name, src.version, f"eval/{k}", repr(float(v)))
            client.set_model_version_tag(src.registered_name, src.version, "eval/run_id", run_id)
            client.set_model_version_tag(src.registered_name, src.version, "eval/data", evaluation.data)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def evaluate_model(
    model: str,
    data: str,
    *,
    batch_size: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log: bool = True,
) -> Evaluation:
    """Load `model`, evaluate on the shards at `data`, log to MLflow (unless log=False)."""
    from pipelines.tracking import resolve_tracking_uri

    detector = load_model(model, tracking_uri=tracking_uri)
    _connect_ray()
    evaluation = run_evaluation(detector, data, val_batch_size(detector, batch_size))
    if log:
        uri = detector.source.tracking_uri or resolve_tracking_uri(tracking_uri or "")
        evaluation.run_id = log_evaluation(detector, evaluation, uri, experiment)
    return evaluation


def _connect_ray() -> None:
    import os

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    else:
        ray.init(include_dashboard=False, configure_logging=False)


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
    if evaluation.run_id:
        lines.append(f"  logged to MLflow run {evaluation.run_id}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    parser.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>, "
        "runs:/<run_id>/model or a checkpoint directory",
    )
    parser.add_argument("--data", required=True, help="prepared shards (folder with manifest.json), local or s3://")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch (default: the training run's data.val_batch_size)",
    )
    parser.add_argument("--experiment", default=None, help="MLflow experiment of the evaluation run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        evaluation = evaluate_model(
            args.model,
            args.data,
            batch_size=args.batch_size,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            log=not args.no_log,
        )
    except (ModelLoadError, DataError, FileNotFoundError, s3.StorageError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(evaluation.report.rstrip())
    print(format_table(evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
