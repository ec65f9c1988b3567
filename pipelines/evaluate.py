"""COCO evaluation of a trained model on prepared shards: AP table printed, logged to MLflow, linked to the model.

    python pipelines/evaluate.py --model models:/retinanet@champion --data data/sample/shards/val
                                 [--batch-size N] [--experiment NAME] [--no-log]

The computation is training's own (pipelines/training/evaluation.py): the val pipeline of
pipelines/data/datasets.py (same decode, same resize, rows in shard order), the same collate,
`model.predict_batch`, the COCO ground truth from the shards and the same COCOeval call. With the training run's
``data.val_batch_size`` (the default, read from the model's config.json) the images are also padded together
exactly as in training's evaluation, so the AP equals the ``val/AP`` training reported for that model. (Padding
matters: the conv borders and GroupNorm statistics see the padded area, so a different batch composition shifts
scores in the last digits.)

MLflow: a new run ("evaluate <model>") in --experiment (default: the experiment of the training run, else
``retina-evaluation``) with the metrics ``eval/AP`` ... and the report (JSON + pycocotools' summary) as
artifacts. The metrics are also attached to the MLflow 3 LoggedModel (``model_id``), and a registered version
gets the tags ``eval/AP`` ..., ``eval/run_id`` and ``eval/data``.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import cli


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
    cli.setup_logging()

    def body() -> int:
        import ray

        from pipelines.inference.evaluation import evaluate_model, format_table

        ray.data.DataContext.get_current().enable_progress_bars = False
        evaluation = evaluate_model(args.model, args.data, batch_size=args.batch_size, tracking_uri=args.tracking_uri,
                                    experiment=args.experiment, log=not args.no_log)  # fmt: skip
        print(evaluation.report.rstrip())
        print(format_table(evaluation))
        return 0

    return cli.run_command("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
