"""Presentation of a loss-concentration result: the paper's Figure 4 as a matplotlib figure, and a text table.

matplotlib is imported inside the figure builder, so importing this module (and ``retina.analysis``) stays free
of it. The figure draws on an Agg canvas of its own and is not registered with pyplot: nothing global changes,
no display is needed, and it is freed with its last reference (``plt.close(fig)`` is harmless).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from retina.analysis.loss_concentration import CurveStats, LossConcentrationResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_PANELS = (("positive", "positive samples", "fraction of foreground samples"),
           ("negative", "negative samples", "fraction of background samples"))  # fmt: skip


def loss_concentration_figure(result: LossConcentrationResult) -> Figure:
    """Two panels like the paper's Figure 4 (positive, negative samples): x the fraction of samples sorted from
    the easiest to the hardest, y the cumulative normalised loss, one line per γ."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    axes = fig.subplots(1, 2)
    for ax, (kind, title, xlabel) in zip(axes, _PANELS, strict=True):
        for g in result.per_gamma:
            stats: CurveStats = getattr(g, kind)
            ax.plot(stats.x, stats.y, label=f"γ = {g.gamma:g}")  # an all-NaN curve (no such anchors) draws nothing
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cumulative normalized loss")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def _shares(stats: CurveStats, fractions: tuple[float, ...]) -> str:
    cells = []
    for f in fractions:
        share = stats.hardest_share[f]
        cells.append("   n/a" if math.isnan(share) else f"{100 * share:5.1f}%")
    return " / ".join(cells)


def format_table(result: LossConcentrationResult) -> str:
    """γ | share of the negatives' loss carried by their hardest 1 % / 5 % / 20 % | the same for positives."""
    head = " / ".join(f"{100 * f:g}%" for f in result.fractions)
    first = result.per_gamma[0]  # counts are the same for every γ
    neg_title = f"negatives (N={first.negative.count}): hardest {head}"
    pos_title = f"positives (P={first.positive.count}): hardest {head}"
    width = max(len(neg_title), 9 * len(result.fractions) - 3)  # a share cell is 6 wide, " / " between cells
    lines = [f"{'γ':>5} | {neg_title:<{width}} | {pos_title}", "-" * (11 + width + len(pos_title))]
    for g in result.per_gamma:
        neg, pos = _shares(g.negative, result.fractions), _shares(g.positive, result.fractions)
        lines.append(f"{g.gamma:>5g} | {neg:<{width}} | {pos}")
    return "\n".join(lines)
