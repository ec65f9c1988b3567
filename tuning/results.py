"""What a finished search leaves behind: a results table (printed, CSV), a picture of val/AP against each
searched hyperparameter, and the champion decision for the best trial's registered model.

The table is read back from the Tune experiment on storage (`ray.tune.ExperimentAnalysis`), not from the
driver's memory, so a resumed search reports the trials of every attempt.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from pipelines.names import CHAMPION_TAG_PREFIX, TRIAL_FINISHED_KEY, VERSION_VAL_AP_TAG
from tuning.space import METRIC, Dimension


@dataclass
class TrialRow:
    name: str  # trial_<number>_<trial id> (tuning.trial.TrialNamer)
    trial_id: str
    params: dict[str, float]  # the searched hyperparameters
    best_ap: float | None  # best val/AP over the trial's evaluations (None: it never evaluated)
    epochs: int  # epochs the trial ran (its last reported epoch)
    status: str  # completed | stopped (by ASHA) | failed | pending/running (search interrupted)
    error: str = ""
    checkpoints: list[str] = field(default_factory=list)  # checkpoint paths, best val/AP first


def _status(trial: Any) -> str:
    if trial.status == "ERROR":
        return "failed"
    if trial.status == "TERMINATED":
        # only a trial that ran to its end reports FINISHED_KEY (Tune sets done=True for stopped trials too)
        return "completed" if TRIAL_FINISHED_KEY in (trial.last_result or {}) else "stopped"
    return str(trial.status).lower()


def _error_line(trial: Any) -> str:
    """The exception's last line without the module path: "NonFiniteLossError: non-finite loss at step 0: ..."."""
    err = trial.get_error()
    lines = str(err).strip().splitlines() if err else []
    if not lines:
        return "error"
    kind, sep, message = lines[-1].partition(": ")
    return (kind.rsplit(".", 1)[-1] + sep + message)[:300]


def collect(experiment_path: str, filesystem: pyarrow.fs.FileSystem | None = None) -> list[TrialRow]:
    """One row per trial of the experiment at `experiment_path` (Tune's storage), in creation order."""
    analysis = ExperimentAnalysis(experiment_path, storage_filesystem=filesystem)
    frames = analysis.trial_dataframes
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: str(t)):  # names start with the zero-padded number
        df = frames.get(trial.trial_id)
        best_ap, epochs, checkpoints = None, 0, []
        if df is not None and METRIC in df.columns and df[METRIC].notna().any():
            best_ap = float(df[METRIC].max())
            epochs = int(df["epoch"].max()) if "epoch" in df.columns else len(df)
            if CHECKPOINT_PATH_KEY in df.columns:
                order = df.sort_values([METRIC, "epoch" if "epoch" in df.columns else METRIC], ascending=False)
                checkpoints = [p for p in order[CHECKPOINT_PATH_KEY].tolist() if isinstance(p, str) and p]
        error = _error_line(trial) if trial.status == "ERROR" else ""
        params = {k: float(v) for k, v in (trial.config or {}).items() if isinstance(v, (int, float))}
        rows.append(TrialRow(str(trial), trial.trial_id, params, best_ap, epochs, _status(trial), error, checkpoints))
    return rows


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest best val/AP among those that evaluated and did not fail (ties: first)."""
    candidates = [r for r in rows if r.best_ap is not None and r.status != "failed" and r.checkpoints]
    return max(candidates, key=lambda r: r.best_ap, default=None)


# ------------------------------------------------------------------------------------------------ table


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table_rows(rows: list[TrialRow], dims: list[Dimension]) -> tuple[list[str], list[list[str]]]:
    header = ["trial", *[d.name for d in dims], METRIC + " (best)", "epochs", "status"]
    body = []
    for r in rows:
        ap = "-" if r.best_ap is None else f"{r.best_ap:.4f}"
        status = r.status + (f" ({_short(r.error)})" if r.error else "")
        body.append([r.name, *[_fmt(r.params.get(d.name)) for d in dims], ap, str(r.epochs), status])
    return header, body


def format_table(rows: list[TrialRow], dims: list[Dimension]) -> str:
    """A fixed-width text table, one line per trial."""
    header, body = table_rows(rows, dims)
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
        w.writerow(["trial", *[d.name for d in dims], "best_val_AP", "epochs", "status", "error"])
        for r in rows:
            w.writerow([r.name, *[r.params.get(d.name, "") for d in dims],
                        "" if r.best_ap is None else r.best_ap, r.epochs, r.status, r.error])  # fmt: skip
    return path


def plot(rows: list[TrialRow], dims: list[Dimension]) -> Figure:
    """val/AP against each searched hyperparameter; failed trials as red crosses on the x axis."""
    fig = Figure(figsize=(4 * len(dims), 3.6), layout="constrained")
    axes = fig.subplots(1, len(dims), squeeze=False)[0]
    for ax, d in zip(axes, dims, strict=True):
        for status, marker, color in (("completed", "o", "tab:blue"), ("stopped", "s", "tab:orange")):
            pts = [(r.params[d.name], r.best_ap) for r in rows if r.status == status and r.best_ap is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=status)
        failed = [r.params[d.name] for r in rows if r.status == "failed" and d.name in r.params]
        if failed:
            ax.scatter(failed, [0.0] * len(failed), marker="x", color="tab:red", label="failed")
        if d.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(d.name)
        ax.set_ylabel(f"best {METRIC}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{METRIC} per trial")
    return fig


# ------------------------------------------------------------------------------------------------ champion


@dataclass
class ChampionDecision:
    alias: str
    candidate_version: str
    candidate_ap: float
    previous_version: str | None  # the version the alias pointed to before (None: no champion yet)
    previous_ap: float | None
    moved: bool
    reason: str

    def tags(self) -> dict[str, str]:
        """The decision as parent-run tags (the comparison stays on record next to the search)."""
        return {
            CHAMPION_TAG_PREFIX + "alias": self.alias,
            CHAMPION_TAG_PREFIX + "candidate_version": self.candidate_version,
            CHAMPION_TAG_PREFIX + "candidate_val_AP": f"{self.candidate_ap:.4f}",
            CHAMPION_TAG_PREFIX + "previous_version": self.previous_version or "none",
            CHAMPION_TAG_PREFIX + "previous_val_AP": "none" if self.previous_ap is None else f"{self.previous_ap:.4f}",
            CHAMPION_TAG_PREFIX + "moved": str(self.moved).lower(),
            CHAMPION_TAG_PREFIX + "reason": self.reason,
        }

    def summary(self) -> str:
        verb = "moved to" if self.moved else "stays on"
        target = self.candidate_version if self.moved else (self.previous_version or "-")
        return f"alias '{self.alias}' {verb} version {target}: {self.reason}"


def promote_if_better(
    client: MlflowClient, name: str, alias: str, version: str, val_ap: float, min_ap: float = 0.0
) -> ChampionDecision:
    """Point `alias` at `version` only if its val/AP beats the current champion's (strictly) and >= min_ap.

    The champion's val/AP is its model-version tag ``val_AP`` (4 decimals), so the candidate is compared at the
    same precision: a re-trained model with the same score does not take the alias. A champion without that tag
    (aliased by hand) cannot be beaten by proof, so the alias stays; remove it to let a search set it.
    """
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return ChampionDecision(alias, version, val_ap, current.version, val_ap, False, "already the champion")
    previous_ap = None
    if current is not None and VERSION_VAL_AP_TAG in (current.tags or {}):
        previous_ap = float(current.tags[VERSION_VAL_AP_TAG])
    candidate = round(val_ap, 4)
    prev_version = str(current.version) if current is not None else None
    if candidate < min_ap:
        moved, reason = False, f"val/AP {candidate:.4f} < tracking.alias_min_ap {min_ap:.4f}"
    elif current is None:
        moved, reason = True, f"no '{alias}' yet; val/AP {candidate:.4f}"
    elif previous_ap is None:
        moved, reason = (
            False,
            f"the current champion (version {prev_version}) has no {VERSION_VAL_AP_TAG} tag to compare",
        )
    elif candidate > previous_ap:
        moved, reason = True, f"val/AP {candidate:.4f} > champion's {previous_ap:.4f} (version {prev_version})"
    else:
        moved, reason = False, f"val/AP {candidate:.4f} <= champion's {previous_ap:.4f} (version {prev_version})"
    if moved:
        # one call moves the alias: consumers of models:/<name>@<alias> never see it missing
        client.set_registered_model_alias(name, alias, version)
    return ChampionDecision(alias, str(version), val_ap, prev_version, previous_ap, moved, reason)
