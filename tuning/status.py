"""How a trial ended: the one vocabulary of the results table, the console, the per-configuration statistics, the
paper grid, the search's metrics and the ``retina.trial_status`` tag of each trial's MLflow run.

A trial is PENDING or RUNNING, then ends COMPLETED (it ran to its last step), STOPPED (ASHA ended it early: the
only thing that stops a trial before its last step here), DIVERGED (its loss stopped being finite: the settings'
fault, not the cluster's) or FAILED (any other error).

Tune itself knows only TERMINATED and ERROR. DIVERGED is decided by the trial, from the type of the driver's
exception (`NonFiniteLossError`), and recorded in its MLflow run's status tag; the search driver reads it back
from there (`tuning.results.with_run_facts`, and the console's lines as trials end), never from error text.
"""

from __future__ import annotations

from typing import Any

from pipelines.names import TRIAL_FINISHED_KEY

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
STOPPED = "stopped"
DIVERGED = "diverged"
FAILED = "failed"

ENDED = (COMPLETED, STOPPED, DIVERGED, FAILED)
FAILURES = (DIVERGED, FAILED)  # no usable result: left out of a configuration's statistics


def of_error(exc: BaseException) -> str:
    """The status of a trial that raised `exc` (on the trial's own driver, where the exception is the real one)."""
    from pipelines.training.run import NonFiniteLossError

    return DIVERGED if isinstance(exc, NonFiniteLossError) else FAILED


def of_finished(trial: Any) -> str:
    """A Tune trial that ended without an error: COMPLETED or STOPPED. Only a trial that ran to its end reports
    TRIAL_FINISHED_KEY (Tune sets done=True for trials ASHA stopped too)."""
    return COMPLETED if TRIAL_FINISHED_KEY in (trial.last_result or {}) else STOPPED


def of_tune(trial: Any) -> str:
    """A Tune trial's status as far as Tune knows it (FAILED for every error; see the module docstring)."""
    if trial.status == "ERROR":
        return FAILED
    if trial.status == "TERMINATED":
        return of_finished(trial)
    return str(trial.status).lower()
