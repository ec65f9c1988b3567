"""COCO evaluation of a trained model on prepared shards: AP table printed, logged to MLflow, linked to the model.

    python pipelines/evaluate.py --model models:/retinanet-demo@champion --data data/sample/shards/val
                                 [--batch-size N] [--experiment NAME] [--no-log]
                                 [--loss-analysis [--gammas 0 0.5 1 2]]

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

--loss-analysis adds the paper's Figure 4 (Lin et al. 2017, §5.1) to the AP: a second streamed pass over the
same val images computes, for every anchor the matcher labels foreground or background, its focal loss at each
of --gammas from the model's own probabilities, and prints which share of the negatives' (and positives') loss
their hardest 1 % / 5 % / 20 % carry. For a model trained with γ = 2 the paper finds nearly all the negative loss
in a small fraction of hard anchors, and at γ = 0 (cross entropy) a spread over the easy majority. Logged into
the same evaluation run: loss_analysis/loss_concentration.png (the two panels), loss_analysis/table.txt,
loss_analysis/result.json (curves, counts, shares) and the metrics loss_analysis/gamma_<γ>/neg_hardest_<f>pct,
.../pos_hardest_<f>pct. Memory stays bounded by one batch whatever the split's size.
"""

from __future__ import annotations

import argparse
import math
import sys

from pipelines import cli

# retina.analysis.loss_concentration.DEFAULT_GAMMAS, spelled out: importing it would load torch for --help
DEFAULT_GAMMAS_HELP = "0 0.5 1 2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_model_arguments(
        parser,
        "models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>, runs:/<run_id>/model or a checkpoint directory",
    )
    parser.add_argument("--data", required=True, help="prepared shards (folder with manifest.json), local or s3://")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the training's data.val_batch_size)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment of the evaluation run")
    parser.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    parser.add_argument(
        "--loss-analysis", action="store_true", help="also the loss concentration over the anchors (Figure 4)"
    )
    parser.add_argument(
        "--gammas",
        type=float,
        nargs="+",
        default=None,
        metavar="γ",
        help=f"the γ values of --loss-analysis (default: {DEFAULT_GAMMAS_HELP})",
    )
    args = parser.parse_args(argv)
    if args.gammas is not None and not args.loss_analysis:
        parser.error("--gammas needs --loss-analysis")
    gammas = args.gammas or []
    if any(not (math.isfinite(g) and g >= 0) for g in gammas) or len(set(gammas)) != len(gammas):
        parser.error(f"--gammas must be distinct numbers >= 0, got {' '.join(f'{g:g}' for g in gammas)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args.verbose)

    def body() -> int:
        import ray

        from pipelines.inference.evaluation import evaluate_model, format_table
        from retina.analysis.loss_concentration import DEFAULT_GAMMAS

        ray.data.DataContext.get_current().enable_progress_bars = False
        gammas = (args.gammas or DEFAULT_GAMMAS) if args.loss_analysis else None
        evaluation = evaluate_model(args.model, args.data, batch_size=args.batch_size, tracking_uri=args.tracking_uri,
                                    experiment=args.experiment, log=not args.no_log,
                                    loss_gammas=gammas)  # fmt: skip
        print(evaluation.report.rstrip())
        print(format_table(evaluation))
        return 0

    return cli.run_command("evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
