"""Every use of Ray beyond its public API, in one place, each with why it is needed. Checked against Ray 2.60.0
(`CHECKED_AGAINST`): a Ray upgrade starts by reading this file; the rest of the code uses public APIs only.

1. `ElasticReservation`: Train V2's elastic policy sizes a (re)started worker group from the reservations of Ray
   Data's AutoscalingCoordinator (ray.data._internal.cluster_autoscaler), counted on every node's *total*
   resources. CPUs a placement group holds for the input pipeline are invisible to it: after a node loss it plans a
   group on them, cannot place it, and retries forever. Registering the reservation with the coordinator, before
   the trainer starts and at the same (high) priority, makes the policy leave those CPUs out.
2. `tuner_run_config`: a restored Tuner runs with the RunConfig pickled when the search began; Ray keeps it in the
   Tuner's private `_local_tuner`. The search sets its verbosity and console callback there on every start.
3. `FilteredTuneReport`: Tune's bridge from Train reports (`TuneReportCallback`, a DeveloperAPI) forwards every
   report; a report without the searched metric ends the whole search (Tune's strict metric check), so those stay
   in Train.
4. Loggers of private Ray modules the console keeps quiet (`QUIET_LOGGERS`): they print, at every start, a notice
   of a choice this project made on purpose.
"""

from __future__ import annotations

import threading
from typing import Any

import ray

CHECKED_AGAINST = "2.60.0"

# 4. "Progress bars disabled" (the commands turn Ray Data's bars off: per-operator bars drown the progress lines),
# and "token authentication is enabled" (the safe default Ray 2.60 turns on for a local cluster).
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


# Set while Tune runs unless --verbose (both are read when the fit starts). Ray 2.60's default output engine prints
# its experiment table and every failed trial's result table even at verbose=0 (ray/tune/experimental/output.py);
# its legacy engine (RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose=0. Tune's controller logs each failed trial's
# whole traceback at ERROR unless TUNE_PRINT_ALL_TRIAL_ERRORS=0; our line names the error and its error.txt.
QUIET_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}

# Tune's log lines that tell a person watching nothing new, dropped unless --verbose (logger → message pattern).
TUNE_CHATTER = {
    "ray.tune.tune": r"^Trials did not complete",  # its closing list: each of them already has its line
    "ray.tune.utils.util": r"may be a performance bottleneck\.$",  # its own loop's timing, slow on a busy machine
}


class ElasticReservation:
    """Tells Train's elastic policy that `bundles` (on the nodes given by `label_selectors`) are taken. Refreshed
    from a daemon thread; the coordinator drops the request `EXPIRE_S` after the last refresh, so a killed driver
    leaves no stale reservation behind for long."""

    EXPIRE_S = 60.0
    REFRESH_S = 15.0

    def __init__(self, requester_id: str, bundles: list[dict[str, float]], label_selectors: list[dict[str, str]]):
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            ResourceRequestPriority,
            get_or_create_autoscaling_coordinator,
        )

        self._coordinator = get_or_create_autoscaling_coordinator()
        # Train asks at HIGH too; equal priorities are served first come first served, and this comes first
        self._request = {"requester_id": requester_id, "resources": bundles, "expire_after_s": self.EXPIRE_S,
                         "priority": ResourceRequestPriority.HIGH, "label_selectors": label_selectors}  # fmt: skip
        self._stop = threading.Event()
        ray.get(self._coordinator.request_resources.remote(**self._request), timeout=30)
        self._thread = threading.Thread(target=self._refresh, name="data-reservation", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.REFRESH_S):
            try:
                self._coordinator.request_resources.remote(**self._request)
            except Exception:  # noqa: BLE001  (Ray shutting down: the request expires by itself)
                return

    def cancel(self) -> None:
        self._stop.set()
        try:
            ray.get(self._coordinator.cancel_request.remote(self._request["requester_id"]), timeout=10)
        except Exception:  # noqa: BLE001  (best effort: it expires after EXPIRE_S anyway)
            pass


def tuner_run_config(tuner: Any) -> Any | None:
    """The RunConfig a (new or restored) Tuner will run with, to adjust in place; None under Ray Client."""
    state = getattr(tuner, "_local_tuner", None)
    return None if state is None else state.get_run_config()


def filtered_tune_report(required_key: str) -> Any:
    """A `TuneReportCallback` that forwards only the reports holding `required_key` (made inside the Tune session,
    as the callback requires)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FilteredTuneReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and required_key in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return FilteredTuneReport()
