"""Where a stored model's classification loss comes from (the paper's Figure 4), on prepared val shards: the
report and the MLflow logging of ``python pipelines/evaluate.py --loss-analysis``. The computation is
``pipelines.inference.evaluation.run_loss_analysis``: the AP evaluation's val pipeline (same decode, resize and
padding) into ``retina.analysis.analyse_batches``.

The numbers are ``retina.analysis``'s: every non-ignored anchor's focal loss at each γ, computed from the model's
own probabilities (the model was trained with one γ; the others show how that loss would weight the same
outputs), accumulated in fixed histograms, so memory is bounded by one batch whatever the split's size.

MLflow (the evaluation run): ``loss_analysis/loss_concentration.png`` (the two panels), ``loss_analysis/table.txt``
(the printed table), ``loss_analysis/result.json`` (``LossConcentrationResult.to_dict()``: counts, totals, shares,
error bounds and the curves' points) and the metrics ``loss_analysis/gamma_<γ>/{neg,pos}_hardest_<f>pct`` (share
of the loss carried by the hardest f of the anchors) plus the anchor counts (names: ``pipelines.names``).
"""

from __future__ import annotations

import math
import time
from typing import Any

from pipelines import names
from retina.analysis import LossConcentrationResult, format_table, loss_concentration_figure


def loss_analysis_metrics(result: LossConcentrationResult) -> dict[str, float]:
    """The shares as MLflow metrics (a curve without anchors, e.g. no positives, gives no metric) and the counts."""
    first = result.per_gamma[0]  # the counts are the same at every γ
    metrics = {
        names.LOSS_ANALYSIS_NUM_NEGATIVES: float(first.negative.count),
        names.LOSS_ANALYSIS_NUM_POSITIVES: float(first.positive.count),
        names.LOSS_ANALYSIS_NUM_IGNORED: float(result.num_ignored),
    }
    for g in result.per_gamma:
        for kind in names.LOSS_ANALYSIS_KINDS:
            for fraction, share in getattr(g, kind).hardest_share.items():
                if math.isfinite(share):
                    metrics[names.loss_analysis_metric(g.gamma, kind, fraction)] = share
    return metrics


def describe(result: LossConcentrationResult) -> str:
    """The printed report: a title, the table of shares, and what was left out."""
    return "\n".join([
        f"Loss concentration (the paper's Figure 4; α = {result.alpha:g}): share of the loss carried by the hardest "
        "anchors, per γ",
        format_table(result),
        f"  ({result.num_ignored} anchors between the matcher's IoU thresholds carry no loss and are left out)",
    ])  # fmt: skip


def log_loss_analysis(client: Any, run_id: str, result: LossConcentrationResult) -> None:
    """The figure, the table, the numbers and the metrics into the MLflow run `run_id` (an open MlflowClient)."""
    from mlflow.entities import Metric

    from pipelines.tracking.store import log_metric_batch

    fig = loss_concentration_figure(result)
    client.log_figure(run_id, fig, names.LOSS_ANALYSIS_FIGURE_ARTIFACT)
    client.log_text(run_id, describe(result), names.LOSS_ANALYSIS_TABLE_ARTIFACT)
    client.log_dict(run_id, result.to_dict(), names.LOSS_ANALYSIS_RESULT_ARTIFACT)
    now = int(time.time() * 1000)
    log_metric_batch(client, run_id, [Metric(k, v, now, 0) for k, v in loss_analysis_metrics(result).items()])
