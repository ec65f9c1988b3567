"""The paper's table layout (Lin et al. 2017, Table 1) for a grid over one or two hyperparameters (the focal-loss
study presets, configs/focal_study.yaml and focal_prior_study.yaml): rows the first searched hyperparameter (γ,
or π), columns the second (α); as text, CSV and an AP heatmap.

Each cell is one configuration (`tuning.configurations`): AP / AP50 / AP75 in % at its trial's best evaluation,
or, with several seeds (tuning.seeds), the mean AP ± its standard deviation over the seeds, the mean AP50 and
AP75, and n; "diverged", "failed" or "stopped" where no seed has an AP.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tuning import configurations as cf
from tuning import results as res
from tuning.space import METRIC, Dimension


def paper_layout(dims: list[Dimension]) -> tuple[Dimension, Dimension | None] | None:
    """(rows, columns) of the paper's table for these searched dimensions: γ × α, or π alone; None for more."""
    if len(dims) in (1, 2):
        return dims[0], (dims[1] if len(dims) == 2 else None)
    return None


@dataclass
class PaperGrid:
    """The configurations of a 1- or 2-dimensional grid, placed: cells[(row value, column value)] (column value
    None without a column dimension)."""

    row_dim: Dimension
    col_dim: Dimension | None
    row_values: list[float]
    col_values: list[float | None]
    cells: dict[tuple[float, float | None], cf.Configuration]
    seeded: bool  # several seeds per configuration: cells show mean ± std and n

    def cell(self, row: float, col: float | None) -> cf.Configuration | None:
        return self.cells.get((row, col))


def paper_grid(rows: list[res.TrialRow], dims: list[Dimension]) -> PaperGrid:
    """Place the configurations (a grid point's trials: one per seed; a seed that ran twice, e.g. in a search
    resumed with --resume-errored, counts once, as `Configuration.seeded` says)."""
    layout = paper_layout(dims)
    if layout is None:
        raise ValueError(f"the paper's layout needs one or two searched dimensions, got {[d.name for d in dims]}")
    row_dim, col_dim = layout
    cells: dict[tuple[float, float | None], cf.Configuration] = {}
    for c in cf.group(rows, [d for d in (row_dim, col_dim) if d is not None]):
        cells[(c.params[row_dim.name], None if col_dim is None else c.params[col_dim.name])] = c
    row_values = sorted({k[0] for k in cells})
    col_values = [None] if col_dim is None else sorted({k[1] for k in cells})
    return PaperGrid(row_dim, col_dim, row_values, col_values, cells, res.seeded(rows))


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def _label(v: float | None) -> str:
    return "" if v is None else f"{v:g}"


def _ap_text(c: cf.Configuration, seeded: bool) -> str:
    """The cell's AP: "34.0" for one seed, "34.0 ± 1.2" over seeds (std "-" below two)."""
    return f"{_pct(c.mean)} ± {_pct(c.std)}" if seeded else _pct(c.mean)


def cell_text(c: cf.Configuration | None, seeded: bool = False) -> str:
    """AP / AP50 / AP75 in % (the paper's precision), with n (and how the other seeds ended) over seeds; or why
    there is none."""
    if c is None:
        return ""
    if c.n == 0:
        return c.status
    text = f"{_ap_text(c, seeded)} / {_pct(c.ap50)} / {_pct(c.ap75)}"
    if seeded:
        text += f" (n={c.n})" if c.status == "completed" else f" (n={c.n}; {c.status})"
    return text


def _aligned(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def _grid_lines(g: PaperGrid) -> list[list[str]]:
    """A header line, then one line per value of the row dimension."""
    corner = g.row_dim.name if g.col_dim is None else f"{g.row_dim.name} \\ {g.col_dim.name}"
    header = [corner, *("AP / AP50 / AP75" if c is None else f"{g.col_dim.name}={c:g}" for c in g.col_values)]
    body = [[_label(v), *(cell_text(g.cell(v, c), g.seeded) for c in g.col_values)] for v in g.row_values]
    return [header, *body]


def _trial_lines(rows: list[res.TrialRow], dims: list[Dimension]) -> list[str]:
    """Per trial: its hyperparameters (and seed), initial loss, whether it diverged, and how it ended."""
    seeds = res.seeded(rows)
    lines = [["trial", *[d.name for d in dims], *(["seed"] if seeds else []), "initial loss", "diverged", "status"]]
    for r in rows:
        status = r.status + (f" ({res.short(r.error, 100)})" if r.error else "")
        seed = [_label(r.seed)] if seeds else []
        lines.append([r.name, *[_label(r.params.get(d.name)) for d in dims], *seed, res.fmt(r.initial_loss),
                      "yes" if r.diverged else "no", status])  # fmt: skip
    return _aligned(lines)


def format_paper_table(rows: list[res.TrialRow], dims: list[Dimension]) -> str:
    """The paper's layout (cells in %, each trial's best evaluation), then every trial's initial loss and end."""
    g = paper_grid(rows, dims)
    grid = _aligned(_grid_lines(g))
    grid.insert(1, "-" * max(len(line) for line in grid))
    if g.seeded:
        title = (f"{METRIC} mean ± std / AP50 / AP75 in % over each configuration's seeds, each seed at its best "
                 "evaluation; n: the seeds with one (the paper's Table 1 layout)")  # fmt: skip
    else:
        title = f"{METRIC} / AP50 / AP75 in % at each trial's best evaluation (the paper's Table 1 layout)"
    return "\n".join([title, "", *grid, "", *_trial_lines(rows, dims)])


def write_paper_csv(rows: list[res.TrialRow], dims: list[Dimension], path: str | Path) -> Path:
    """The paper's layout as CSV: one line per row value; per column value the AP (the mean over seeds), its
    standard deviation (empty below two seeds), n, the mean AP50 and AP75 (0..1, full precision, empty without
    an evaluation) and how its trials ended (completed, stopped, diverged, failed, or their counts)."""
    g = paper_grid(rows, dims)
    prefixes = ["" if c is None else f"{g.col_dim.name}={c:g} " for c in g.col_values]
    keys = ("AP", "AP std", "n", "AP50", "AP75", "status")
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([g.row_dim.name, *[p + k for p in prefixes for k in keys]])
        for v in g.row_values:
            line: list[Any] = [v]
            for col in g.col_values:
                c = g.cell(v, col)
                line += [""] * len(keys) if c is None else [_blank(c.mean), _blank(c.std), c.n, _blank(c.ap50),
                                                            _blank(c.ap75), c.status]  # fmt: skip
            w.writerow(line)
    return path


def _blank(v: float | None) -> float | str:
    return "" if v is None else v


def heatmap(rows: list[res.TrialRow], dims: list[Dimension]) -> Figure:
    """AP (%) over the paper's grid (γ × α, or π alone): each configuration's, the mean over its seeds when there
    are several (annotated with ± std and n); grey where no seed has an AP (its cell says why: diverged, failed,
    stopped early without an evaluation)."""
    g = paper_grid(rows, dims)
    values = np.full((len(g.row_values), len(g.col_values)), np.nan)  # (rows, columns) AP in %
    fig = Figure(figsize=(1.6 * len(g.col_values) + 2.6, 0.6 * len(g.row_values) + 1.8), layout="constrained")
    ax = fig.subplots()
    for i, v in enumerate(g.row_values):
        for j, col in enumerate(g.col_values):
            c = g.cell(v, col)
            if c is not None and c.mean is not None:
                values[i, j] = 100 * c.mean
                text = _ap_text(c, g.seeded) + (f"\nn={c.n}" if g.seeded else "")
            else:
                text = cell_text(c)
            ax.text(j, i, text, ha="center", va="center", bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.set_facecolor("lightgrey")  # masked cells (no AP) show the background
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    what = f"mean {METRIC} over seeds (%)" if g.seeded else f"best {METRIC} (%)"
    fig.colorbar(image, ax=ax, label=what)
    ax.set_yticks(range(len(g.row_values)), [_label(v) for v in g.row_values])
    ax.set_ylabel(g.row_dim.name)
    if g.col_dim is None:
        ax.set_xticks([])
    else:
        ax.set_xticks(range(len(g.col_values)), [_label(c) for c in g.col_values])
        ax.set_xlabel(g.col_dim.name)
    pair = "" if g.col_dim is None else f" over {g.row_dim.name} × {g.col_dim.name}"
    ax.set_title(f"{what}{pair}")
    return fig
