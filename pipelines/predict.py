"""Batch inference: a registered model (or checkpoint) over a folder of images with Ray Data, COCO results out.

    python pipelines/predict.py --model models:/retinanet-demo@champion --images DIR|s3://... --output DIR|s3://...
                                [--score-threshold 0.3] [--render] [--batch-size 8] [--num-actors N]

--model: models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>, runs:/<run_id>/model, or a checkpoint
directory holding state.pt (local or s3://). MLflow: $MLFLOW_TRACKING_URI or --tracking-uri, else
sqlite:///mlflow.db in the working directory (as training).

Outputs under --output:
  detections.json  COCO results: [{"image_id", "category_id" (the original COCO id), "bbox" [x, y, w, h], "score"}]
  images.json      {"images": [{"id", "file_name", "height", "width"}], "categories": [{"id", "name"}]}
  skipped.json     [{"file_name", "error"}] for every file that could not be read or decoded (not fatal)
  summary.json     counts, model, threshold
  rendered/        with --render: each image with its boxes, class names and scores drawn

Image ids are 1..N in sorted file-name order. How it runs: pipelines/inference/batch.py.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_model_arguments(parser, "model URI or checkpoint directory (see below)")
    parser.add_argument("--images", required=True, help="folder of images, local or s3://bucket/prefix")
    parser.add_argument("--output", required=True, help="output folder, local or s3://bucket/prefix")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep detections scoring at least this (default: the model's postprocess.score_thresh)",
    )
    parser.add_argument("--render", action="store_true", help="also write the images with boxes drawn to rendered/")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    parser.add_argument(
        "--num-actors", type=int, default=None, help="model replicas (default: one per GPU of the cluster, else 1)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when Ray has GPUs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.score_threshold is not None and not 0 <= args.score_threshold < 1:
        print(f"predict: --score-threshold must be in [0, 1), got {args.score_threshold}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2

    def body() -> int:
        import ray

        from pipelines.inference.batch import format_summary, predict

        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = predict(args.model, args.images, args.output, score_threshold=args.score_threshold,
                          render=args.render, batch_size=args.batch_size, num_actors=args.num_actors,
                          device=args.device, tracking_uri=args.tracking_uri)  # fmt: skip
        print(format_summary(summary))
        return 0

    return cli.run_command("predict", body)


if __name__ == "__main__":
    sys.exit(main())
