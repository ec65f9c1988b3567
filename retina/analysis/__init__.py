"""Analyses of a trained detector. Pure torch/numpy; matplotlib only inside ``figure.loss_concentration_figure``.

- ``loss_concentration``: the paper's Figure 4, how the focal loss concentrates on hard examples, streamed over
  a split (``LossConcentration``, ``analyse_batches``);
- ``figure``: its two-panel figure and a text table of the hardest-fraction shares.
"""

from retina.analysis.figure import format_table, loss_concentration_figure
from retina.analysis.loss_concentration import (
    CurveStats,
    GammaConcentration,
    LossConcentration,
    LossConcentrationResult,
    analyse_batches,
    per_anchor_losses,
)

__all__ = [
    "CurveStats",
    "GammaConcentration",
    "LossConcentration",
    "LossConcentrationResult",
    "analyse_batches",
    "format_table",
    "loss_concentration_figure",
    "per_anchor_losses",
]
