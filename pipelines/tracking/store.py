"""The MLflow store: where it is, one run per training run (found again on resume), and a run's final status.

One training run = one MLflow run, also across worker restarts (FailureConfig) and re-runs of the same command
(resume): the driver looks the run up by a ``retina.run_key`` tag (storage path + run name, the same key Ray
Train uses to find its checkpoints) before ``trainer.fit`` and hands its run id to the workers. Workers never
create runs; rank 0 logs into the given run id through an explicit `MlflowClient` (no global active-run state,
which does not exist inside Ray workers anyway).

Metric history after a restart: the steps between the restored checkpoint and the failure are trained again.
`RunLogger` skips (step, key) pairs at or below what the run already holds, so a curve never gets two points at
one step (MLflow cannot delete metric points); the logged value at such a step is the first attempt's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipelines.names import ERROR_TAG, RUN_KEY_TAG

logger = logging.getLogger("retina.tracking")

DEFAULT_STORE = "mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(configured: str = "") -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else an embedded SQLite store ``mlflow.db`` in the cwd.

    A relative SQLite path is made absolute: Ray workers do not share the driver's working directory.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_STORE}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).absolute())
    return uri


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_LENGTH]


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The experiment's id, created if missing. In a SQLite store its artifacts go to ``mlruns/`` beside the
    database file: MLflow's own default is ``./mlruns`` in whatever directory the creating process runs in, which
    scatters a store's artifacts over working directories (and into checkouts)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = (Path(client.tracking_uri[len("sqlite:///") :]).parent / "mlruns").absolute().as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def find_run(tracking_uri: str, experiment: str, run_key: str) -> Any | None:
    """The MLflow run that carries `run_key` (the oldest, should there be several), or None."""
    client = MlflowClient(tracking_uri)
    escaped = run_key.replace("'", "\\'")
    query = f"tags.`{RUN_KEY_TAG}` = '{escaped}'"
    found = client.search_runs([experiment_id(client, experiment)], query, max_results=1, order_by=["start_time ASC"])
    return found[0] if found else None


def changed_params(run: Any, params: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose value differs from what `run` logged (MLflow params are immutable)."""
    values = {k: _param_value(v) for k, v in params.items()}
    return sorted(k for k, v in values.items() if k in run.data.params and run.data.params[k] != v)


def retire_run_key(tracking_uri: str, run: Any) -> None:
    """Detach `run` from its run key (a restart starts a new run under the key; the old one stays readable)."""
    key = run.data.tags.get(RUN_KEY_TAG, "")
    MlflowClient(tracking_uri).set_tag(
        run.info.run_id, RUN_KEY_TAG, f"{key} (replaced {time.strftime('%Y-%m-%d %H:%M:%S')})"
    )


def start_or_resume_run(
    tracking_uri: str, experiment: str, run_name: str, run_key: str, params: Mapping[str, Any]
) -> tuple[str, bool]:
    """The id of the MLflow run for `run_key` (created with `params` when new) and whether it already existed.

    A resumed run is set back to RUNNING. Params that differ from the stored ones (an override changed between
    attempts) are reported in the log, not re-logged: MLflow params are immutable.
    """
    client = MlflowClient(tracking_uri)
    values = {k: _param_value(v) for k, v in params.items()}
    run = find_run(tracking_uri, experiment, run_key)
    if run is not None:
        changed = changed_params(run, params)
        if changed:
            logger.warning("resuming MLflow run %s with changed settings (not re-logged): %s", run.info.run_id, changed)
        new = [Param(k, v) for k, v in values.items() if k not in run.data.params]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run.info.run_id, params=new[i : i + 100])
        client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run.info.run_id, True
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags={RUN_KEY_TAG: run_key})
    items = [Param(k, v) for k, v in values.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, False


def log_metric_batch(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    """``log_batch`` in chunks: MLflow takes at most 1000 metrics per call (per-class AP/AP50 of LVIS: 2406)."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


class RunOutcome:
    """What `tracked_run` will set when its block ends without an exception (the block may change it)."""

    def __init__(self) -> None:
        self.status = "FINISHED"
        self.tags: dict[str, str] = {}  # set with the final status


@contextlib.contextmanager
def tracked_run(
    tracking_uri: str,
    run_id: str,
    *,
    failure_tags: Mapping[str, str] | Callable[[BaseException], Mapping[str, str]] | None = None,
) -> Iterator[RunOutcome]:
    """Close MLflow run `run_id` with the outcome of the block: the one owner of FINISHED / FAILED / KILLED.

    Ctrl-C or SIGTERM (KeyboardInterrupt, SystemExit) → KILLED; any other exception → the ``retina.error`` tag (its
    type and message) plus `failure_tags` (or `failure_tags(exception)`), then FAILED; the exception propagates.
    Normal exit → ``status.tags``, then ``status.status`` (FINISHED unless the block set another).
    """
    client = MlflowClient(tracking_uri)
    status = RunOutcome()
    try:
        yield status
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or Ray's SIGINT/SIGTERM handlers exiting (pipelines/cli.py)
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as exc:
        extra = failure_tags(exc) if callable(failure_tags) else failure_tags or {}
        for key, value in {ERROR_TAG: f"{type(exc).__name__}: {exc}"[:5000], **extra}.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, "FAILED")
        raise
    for key, value in status.tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status.status)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, sorted by step."""
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)
