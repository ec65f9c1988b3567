"""What a person watching a search sees: the driver's own lines, one per trial as it ends, then (tuning.experiment
`summary`) a table of every trial, best val/AP first, the best trial and where its MLflow runs are:

  17:02:11 trial_000_3f2a91c0  completed             gamma=2 alpha=0.25 prior=0.01  val/AP 0.3120  AP50 0.5010  2 epochs
  17:03:40 trial_001_8b1d4e77  diverged              gamma=5 alpha=0.75 prior=0.01  val/AP -       AP50 -       0 epochs
           NonFiniteLossError: non-finite loss at step 1 ...
  17:04:02 trial_002_c0ffee12  stopped early (ASHA)  gamma=0.5 alpha=0.5 prior=0.01  val/AP 0.1021  AP50 0.2210  1 epoch

Ray Tune's own output (its status table every few seconds, every result a trial reports, each failed trial's
traceback) is off unless --verbose; the tracebacks stay in the trials' error.txt files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from cluster import s3
from cluster.ray_compat import QUIET_TUNE_ENV, TUNE_CHATTER, tuner_run_config
from pipelines.names import EPOCH, VAL_AP50
from tuning import results as res
from tuning import status
from tuning.seeds import SEED_KEY
from tuning.space import METRIC

logger = logging.getLogger("retina.tune")

ALWAYS_SHOWN = ("gamma", "alpha", "prior")  # the focal-loss setting of every trial, searched or not


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# ------------------------------------------------------------------------------------------------ Tune's output


def tune_verbosity(verbose: bool) -> int | None:
    """``tune.RunConfig.verbose``: Tune's default (its status table, every result) with --verbose, else silent."""
    return None if verbose else 0


@contextmanager
def tune_output(verbose: bool) -> Iterator[None]:
    """Around ``Tuner.fit``: Tune prints nothing of its own unless `verbose`. A value already in the environment
    (the user's choice) is kept."""
    added = {} if verbose else {k: v for k, v in QUIET_TUNE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    filters = {} if verbose else {logging.getLogger(name): _Drop(pattern) for name, pattern in TUNE_CHATTER.items()}
    for tune_logger, drop in filters.items():
        tune_logger.addFilter(drop)
    try:
        yield
    finally:
        for tune_logger, drop in filters.items():
            tune_logger.removeFilter(drop)
        for key in added:
            os.environ.pop(key, None)


def configure(tuner: tune.Tuner, lines: TrialLines, verbose: bool) -> None:
    """Tune's verbosity and our trial lines, on a new or a restored Tuner.

    A restored Tuner runs with the RunConfig pickled when the search began (its tuner.pkl), so both are set here,
    for every command, instead of at construction: --verbose then means the same on a resumed search, and a search
    started before these lines existed prints them too. Ray 2.60 keeps that RunConfig in the Tuner's in-process
    state (absent under Ray Client, where Tune's own output stays as it was).
    """
    run_config = tuner_run_config(tuner)  # a private Tuner attribute: cluster/ray_compat.py
    if run_config is None:
        return
    run_config.verbose = tune_verbosity(verbose)
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, TrialLines)]
    run_config.callbacks = [*kept, lines]


# ------------------------------------------------------------------------------------------------ one line a trial


def _ap(value: float | None) -> str:
    return f"{'-':<6}" if value is None else f"{value:.4f}"


def trial_line(r: res.TrialRow, names: Sequence[str], detail: str = "") -> str:
    """One trial as it ended: name, end state, hyperparameters `names` (and its seed, when the search has several),
    best val/AP with its AP50, epochs run, and `detail` (a failure's error) on a second line."""
    params = " ".join([*(f"{n}={r.params[n]:.4g}" for n in names if n in r.params),
                       *([f"seed={r.seed}"] if r.seed is not None else [])])  # fmt: skip
    epochs = f"{r.epochs} epoch{'' if r.epochs == 1 else 's'}"
    line = f"{r.name}  {res.end_state(r):<20}  {params}  {METRIC} {_ap(r.best_ap)}  AP50 {_ap(r.ap50)}  {epochs}"
    return line + (f"\n         {detail}" if detail else "")


def shown_names(dims: Sequence[Any]) -> list[str]:
    """γ, α and π always, then whatever else is searched (the learning rate)."""
    return [*ALWAYS_SHOWN, *(d.name for d in dims if d.name not in ALWAYS_SHOWN)]


class TrialLines(tune.Callback):
    """On the search driver: logs one line per trial as it ends (completed, stopped early by ASHA, diverged,
    failed with its error class) to the "retina.tune" logger, i.e. the console."""

    def __init__(
        self,
        names: Sequence[str],
        base: dict[str, float],
        experiment_display: str,
        recorded: Callable[[str], str | None] | None = None,
    ):
        self.names = list(names)  # hyperparameters shown, in order
        self.base = dict(base)  # their values in the search's config: what a trial that does not search one uses
        self.experiment_display = experiment_display  # the Tune experiment as the user names it (errors live there)
        self.best: dict[str, tuple[float, float | None]] = {}  # trial id → (val/AP, AP50) of its best result seen
        # trial id → the status the trial recorded in its MLflow run (tells a divergence from another failure)
        self.recorded = recorded or (lambda trial_id: None)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        ap = result.get(METRIC)
        if ap is not None and (trial.trial_id not in self.best or ap > self.best[trial.trial_id][0]):
            self.best[trial.trial_id] = (float(ap), result.get(VAL_AP50))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, failed=True)

    def _log(self, trial: Any, failed: bool) -> None:
        try:
            if failed:  # Tune has not marked the trial yet: the callback says how it ended
                error = _error(trial)
                state = status.DIVERGED if self.recorded(trial.trial_id) == status.DIVERGED else status.FAILED
            else:
                error, state = "", status.of_finished(trial)
            row = self.row(trial, state, error)
            detail = error
            if error and not row.diverged:  # a crash: its traceback is worth opening; a divergence says it all
                detail += f"  (traceback: {s3.join(self.experiment_display, Path(trial.path).name)}/error.txt)"
            logger.info(trial_line(row, self.names, detail))
        except Exception:  # a console line must never end the search
            logger.debug("no console line for trial %s", trial, exc_info=True)

    def row(self, trial: Any, status: str, error: str) -> res.TrialRow:
        """The trial as the results table will show it, from what the driver knows now."""
        config = trial.config or {}
        params = {n: float(config.get(n, self.base[n])) for n in self.names if n in config or n in self.base}
        ap, ap50 = self._best(trial)
        epochs = int((trial.last_result or {}).get(EPOCH, 0))
        seed = config.get(SEED_KEY)
        return res.TrialRow(str(trial), trial.trial_id, params, ap, epochs, status, error, ap50=ap50,
                            seed=None if seed is None else int(seed))  # fmt: skip

    def _best(self, trial: Any) -> tuple[float | None, float | None]:
        """Best val/AP and its AP50; a restored trial's evaluations before this driver are known by their maximum
        only (Tune's metric analysis), without the AP50 that came with it."""
        seen = self.best.get(trial.trial_id)
        overall = (trial.metric_analysis or {}).get(METRIC, {}).get("max")
        if seen is not None and (overall is None or seen[0] >= overall):
            return seen
        return (None if overall is None else float(overall)), None


def _error(trial: Any) -> str:
    """The failed trial's exception as one line, from the error.txt Tune has just written on this machine."""
    local = trial.error_file
    if local and Path(local).exists():
        return res.error_line(Path(local).read_text())
    err = trial.get_error()
    return res.error_line(str(err)) if err else "error"
