"""What a finished search leaves behind, trial by trial: a results table (printed, CSV), a picture of val/AP
against each searched hyperparameter, and the champion decision for the registered model.

The table is read back from the Tune experiment on storage (`ray.tune.ExperimentAnalysis`), not from the
driver's memory, so a resumed search reports the trials of every attempt; each trial's initial loss comes from
its MLflow child run (the worker loop logs it at step 0; Tune never sees it).

The trials grouped by configuration across seeds (mean, std, n; which one is the champion):
`tuning.configurations`; the paper's table layout of a grid: `tuning.paper`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from pipelines.names import (
    MLFLOW_PARENT_TAG,
    TRAIN_INITIAL_LOSS,
    TRIAL_ID_TAG,
    TRIAL_STATUS_TAG,
    VAL_AP50,
    VAL_AP75,
)
from tuning import status
from tuning.seeds import SEED_KEY
from tuning.space import METRIC, Dimension


@dataclass
class TrialRow:
    name: str  # trial_<number>_<trial id> (tuning.trial.TrialNamer)
    trial_id: str
    params: dict[str, float]  # the searched hyperparameters
    best_ap: float | None  # best val/AP over the trial's evaluations (None: it never evaluated)
    epochs: int  # epochs the trial ran (its last reported epoch)
    status: str  # tuning.status: completed | stopped (by ASHA) | diverged | failed | pending/running (interrupted)
    error: str = ""
    checkpoints: list[str] = field(default_factory=list)  # checkpoint paths, best val/AP first
    ap50: float | None = None  # val/AP50 and val/AP75 of the evaluation with the best val/AP
    ap75: float | None = None
    initial_loss: float | None = None  # train/initial_loss of its MLflow run (None: not logged, or non-finite)
    seed: int | None = None  # its train.seed when the search runs several seeds (tuning.seeds); None: the base's

    @property
    def diverged(self) -> bool:
        """The trial ended because its loss stopped being finite (not a crash or a lost node)."""
        return self.status == status.DIVERGED

    @property
    def failed(self) -> bool:
        """Diverged or failed: no usable result."""
        return self.status in status.FAILURES


def error_line(text: str) -> str:
    """A trial's error text (Tune's error.txt, a traceback) → its exception's last line without the module path:
    "NonFiniteLossError: non-finite loss at step 0: ..."."""
    lines = str(text).strip().splitlines()
    if not lines:
        return "error"
    kind, sep, message = lines[-1].partition(": ")
    return (kind.rsplit(".", 1)[-1] + sep + message)[:300]


def error_kind(error: str) -> str:
    """The exception class of an `error_line`: "NonFiniteLossError: non-finite loss ..." → "NonFiniteLossError"
    (a line that names no class, e.g. a lost actor's sentence, is shortened instead)."""
    kind = error.partition(": ")[0]
    return kind if kind.isidentifier() else short(kind or "error", 40)


def _error_line(trial: Any) -> str:
    err = trial.get_error()
    return error_line(str(err)) if err else "error"


def _evaluations(df: Any) -> dict[str, Any]:
    """From a trial's Tune results: best val/AP, AP50/AP75 of that evaluation, epochs, checkpoints best first."""
    if df is None or METRIC not in df.columns or not df[METRIC].notna().any():
        return {}
    best = df.loc[df[METRIC].idxmax()]
    out: dict[str, Any] = {
        "best_ap": float(best[METRIC]),
        "epochs": int(df["epoch"].max()) if "epoch" in df.columns else len(df),
        "ap50": float(best[VAL_AP50]) if VAL_AP50 in df.columns else None,
        "ap75": float(best[VAL_AP75]) if VAL_AP75 in df.columns else None,
    }
    if CHECKPOINT_PATH_KEY in df.columns:
        order = df.sort_values([METRIC, "epoch" if "epoch" in df.columns else METRIC], ascending=False)
        out["checkpoints"] = [p for p in order[CHECKPOINT_PATH_KEY].tolist() if isinstance(p, str) and p]
    return out


def collect(experiment_path: str, filesystem: pyarrow.fs.FileSystem | None = None) -> list[TrialRow]:
    """One row per trial of the experiment at `experiment_path` (Tune's storage), in creation order."""
    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=filesystem)
    frames = analysis.trial_dataframes
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: str(t)):  # names start with the zero-padded number
        found = {"best_ap": None, "epochs": 0, **_evaluations(frames.get(trial.trial_id))}
        error = _error_line(trial) if trial.status == "ERROR" else ""
        config = dict(trial.config or {})
        seed = config.pop(SEED_KEY, None)  # a training setting, not a hyperparameter: it names the repeat
        params = {k: float(v) for k, v in config.items() if isinstance(v, (int, float))}
        rows.append(TrialRow(str(trial), trial.trial_id, params, status=status.of_tune(trial), error=error,
                             seed=None if seed is None else int(seed), **found))  # fmt: skip
    return rows


def with_run_facts(rows: list[TrialRow], client: MlflowClient, parent_run_id: str) -> list[TrialRow]:
    """`rows` with what only each trial's MLflow child run knows (one search over the children): its
    ``train/initial_loss``, and whether a failed trial diverged (the status it recorded, `tuning.status`)."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_TAG}` = '{parent_run_id}'")
    by_trial = {c.data.tags[TRIAL_ID_TAG]: c.data for c in children if TRIAL_ID_TAG in c.data.tags}
    out = []
    for r in rows:
        data = by_trial.get(r.trial_id)
        if data is None:
            out.append(r)
            continue
        diverged = r.status == status.FAILED and data.tags.get(TRIAL_STATUS_TAG) == status.DIVERGED
        out.append(dataclasses.replace(r, initial_loss=data.metrics.get(TRAIN_INITIAL_LOSS, r.initial_loss),
                                       status=status.DIVERGED if diverged else r.status))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ table


def fmt(v: float | None, digits: int = 4) -> str:
    """A hyperparameter or loss in a table: 4 decimals (4 significant digits below 1e-3); "-" for none."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def end_state(r: TrialRow) -> str:
    """How a trial ended, in words a person reads: completed | stopped early (ASHA) | diverged | failed (<error
    class>); pending/running for the trials of an interrupted search. ASHA is the only thing that stops a trial
    before its last step here (no Tune stoppers), so "stopped" is always its decision."""
    if r.status == status.STOPPED:
        return "stopped early (ASHA)"
    if r.status == status.FAILED:
        return f"failed ({error_kind(r.error)})"
    return r.status


def state_counts(rows: list[TrialRow]) -> str:
    """Trials per end state, e.g. "2 completed, 1 stopped early (ASHA), 1 diverged" (first seen first)."""
    counts: dict[str, int] = {}
    for r in rows:
        state = end_state(r)
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def by_ap(rows: list[TrialRow]) -> list[TrialRow]:
    """Best val/AP first; trials that never evaluated last (each group in creation order)."""
    return sorted(rows, key=lambda r: (r.best_ap is None, -(r.best_ap or 0.0)))


def seeded(rows: list[TrialRow]) -> bool:
    """Whether these trials come from a search with several seeds per configuration (tuning.seeds > 1)."""
    return any(r.seed is not None for r in rows)


def table_rows(rows: list[TrialRow], dims: list[Dimension]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the trial table; a seed column after the hyperparameters when the search has seeds."""
    seeds = seeded(rows)
    header = ["trial", *[d.name for d in dims], *(["seed"] if seeds else []), METRIC, "AP50", "epochs", "status"]
    body = []
    for r in rows:
        ap, ap50 = ("-" if v is None else f"{v:.4f}" for v in (r.best_ap, r.ap50))
        seed = [str(r.seed) if r.seed is not None else "-"] if seeds else []
        body.append([r.name, *[fmt(r.params.get(d.name)) for d in dims], *seed, ap, ap50, str(r.epochs),
                     end_state(r)])  # fmt: skip
    return header, body


def format_table(rows: list[TrialRow], dims: list[Dimension]) -> str:
    """A fixed-width text table, one line per trial in the order given (`by_ap` for the best first); AP and AP50
    of each trial's best evaluation."""
    return fixed_width(*table_rows(rows, dims))


def fixed_width(header: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell (the last one left ragged), a rule under the header."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        cells = [c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)] + [line[-1]]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def write_csv(rows: list[TrialRow], dims: list[Dimension], path: str | Path) -> Path:
    """The table as CSV with full-precision numbers (empty cell: never evaluated)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *[d.name for d in dims], "best_val_AP", "epochs", "status", "error",
                    "val_AP50", "val_AP75", "initial_loss", "diverged", "seed"])  # fmt: skip
        for r in rows:
            w.writerow([r.name, *[r.params.get(d.name, "") for d in dims], _blank(r.best_ap), r.epochs, r.status,
                        r.error, _blank(r.ap50), _blank(r.ap75), _blank(r.initial_loss), r.diverged,
                        "" if r.seed is None else r.seed])  # fmt: skip
    return path


def _blank(v: float | None) -> float | str:
    return "" if v is None else v


def plot(rows: list[TrialRow], dims: list[Dimension]) -> Figure:
    """val/AP against each searched hyperparameter; failed trials as red crosses on the x axis."""
    fig = Figure(figsize=(4 * len(dims), 3.6), layout="constrained")
    axes = fig.subplots(1, len(dims), squeeze=False)[0]
    for ax, d in zip(axes, dims, strict=True):
        for state, marker, color in ((status.COMPLETED, "o", "tab:blue"), (status.STOPPED, "s", "tab:orange")):
            pts = [(r.params[d.name], r.best_ap) for r in rows if r.status == state and r.best_ap is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=state)
        failed = [r.params[d.name] for r in rows if r.failed and d.name in r.params]
        if failed:
            ax.scatter(failed, [0.0] * len(failed), marker="x", color="tab:red", label="failed or diverged")
        if d.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(d.name)
        ax.set_ylabel(f"best {METRIC}")
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # no trial with a result yet: no legend (matplotlib would warn)
        axes[0].legend(fontsize="small")
    fig.suptitle(f"{METRIC} per trial")
    return fig
