"""One Tune trial = one multi-worker TorchTrainer run (Ray Train V2) with the trial's γ, α, π (, lr) and seed.

The trial function is the Train driver: it builds the training config for its hyperparameters, opens its MLflow
child run (nested under the search's parent run through the ``mlflow.parentRunId`` tag), and runs the same
TorchTrainer and per-worker loop as ``pipelines/train.py``. Rank 0's report of every evaluation reaches Tune
through `evaluation_report()`, so ASHA can stop a weak trial between epochs.

Names are deterministic (Train run ``<search dir>/trials/<trial id>``, MLflow run found by that key), so a trial
that a resumed search starts again continues its Train run from its latest checkpoint and logs into the same
MLflow run instead of starting over.

A trial that diverges (non-finite loss) or fails raises: Tune records it as ERROR, the searcher gets a failed
trial, and the other trials go on (fail_fast is off).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray import tune

from cluster import s3
from cluster.ray_compat import filtered_tune_report
from pipelines import names
from pipelines.config import Config
from pipelines.tracking import store
from pipelines.training.faults import Faults
from pipelines.training.run import Prepared, fit
from pipelines.training.trainer import best_checkpoint
from retina.typed_config import flatten, to_dict
from tuning import status
from tuning.seeds import with_seed
from tuning.space import METRIC, apply_hyperparameters

logger = logging.getLogger("retina.tune")


@dataclass
class TrialSetup:
    """What every trial shares; handed to the trials through `tune.with_parameters` (the object store)."""

    run: Prepared  # the search's config (local paths absolute: trials run in other directories) and its data
    trials_dir: str  # Train runs of the trials: <trials_dir>/<trial id> (local path or s3://)
    tracking_uri: str
    experiment: str
    parent_run_id: str
    faults: Faults  # test-only fault injection (pipelines/training/faults.py), read once by the search driver


class TrialNamer:
    """Tune's ``trial_name_creator``: ``trial_<number>_<trial id>``, number = 0-based creation order.

    The number comes from the trial's experiment tag, which starts with the search generator's counter (0-based
    for Tune's grid generator, 1-based behind a searcher such as Optuna, hence `offset`); the counter is part
    of the saved search state, so a restored search keeps numbering where it stopped.
    """

    def __init__(self, offset: int):
        self.offset = offset

    def __call__(self, trial: Any) -> str:
        number = int(str(trial.experiment_tag).split("_", 1)[0]) - self.offset
        return f"trial_{number:03d}_{trial.trial_id}"


def trial_number(name: str) -> int:
    """The creation number in a `TrialNamer` name (``trial_003_ab12cd34`` → 3)."""
    return int(name.split("_")[1])


def child_run_key(trials_dir: str, trial_name: str) -> str:
    """The MLflow run key of a trial: its Train run folder, as `pipelines.training.run` keys a training run."""
    return s3.join(trials_dir, trial_name)


def find_child_run(tracking_uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run id of a trial of this search, or None when the trial never got as far as creating it."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{names.MLFLOW_PARENT_TAG}` = '{parent_run_id}' and "
        f"tags.`{names.TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def close_interrupted(tracking_uri: str, experiment: str, parent_run_id: str, trial_ids: list[str]) -> None:
    """Mark the child runs of trials an interrupted search left unfinished KILLED (else they would show RUNNING
    until the search is resumed, which sets each back to RUNNING as its trial continues)."""
    client = MlflowClient(tracking_uri)
    for trial_id in trial_ids:
        run_id = find_child_run(tracking_uri, experiment, parent_run_id, trial_id)
        if run_id is not None and client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")


def recorded_status(tracking_uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The status a trial recorded in its MLflow run (`tuning.status`), or None without a run.

    For a trial that `TrialRunStatus` has just closed on this driver, the status it read and left there: the
    console's line for the same ended trial asks right after it, and one MLflow search per trial is enough.
    """
    closed = _closed_status.pop((parent_run_id, trial_id), _NOT_CLOSED)
    if closed is not _NOT_CLOSED:
        return closed
    run_id = find_child_run(tracking_uri, experiment, parent_run_id, trial_id)
    return None if run_id is None else MlflowClient(tracking_uri).get_run(run_id).data.tags.get(names.TRIAL_STATUS_TAG)


def evaluation_report() -> Any:
    """Forwards rank 0's evaluation reports to Tune; drops reports without val/AP.

    A report without val/AP would reach Tune otherwise (a diverged run's). Tune treats a
    result without the searched metric as a bug and ends the whole search (strict metric checking), so that
    report stays in Train: the trial function raises on it after ``fit`` instead, failing only this trial.
    (A subclass of Tune's TuneReportCallback, which is not public API: it lives in cluster/ray_compat.py.)
    """
    return filtered_tune_report(METRIC)


def trial_config(setup: TrialSetup, params: dict[str, Any], trial_name: str) -> Config:
    """The trial's training config: its hyperparameters and seed, its own Train run name and folder."""
    cfg = with_seed(apply_hyperparameters(setup.run.config, params), params)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=trial_name, storage_path=setup.trials_dir))


def _failure_verdict(exc: BaseException) -> dict[str, str]:
    """The status tag of a trial that raised `exc`. Decided here, in the trial's own driver: a divergence is told
    from other failures by the exception's type, and only here is the exception the real one (the search driver
    gets its text)."""
    return {names.TRIAL_STATUS_TAG: status.of_error(exc)}


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: one TorchTrainer run; raises when it diverges or fails."""
    ctx = tune.get_context()
    trial_id, name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(setup, params, name)
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars drown the trial logs

    run_params = {**flatten(to_dict(cfg)), **params}
    run_id, resumed = store.start_or_resume_run(
        setup.tracking_uri, setup.experiment, name, child_run_key(setup.trials_dir, name), run_params
    )
    client = MlflowClient(setup.tracking_uri)
    tags = {
        names.MLFLOW_PARENT_TAG: setup.parent_run_id,
        names.TRIAL_ID_TAG: trial_id,
        names.TRIAL_STATUS_TAG: status.RUNNING,
    }
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if resumed and names.ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, names.ERROR_TAG)  # an earlier attempt's error, not this one's
    logger.info("%s%s: %s (MLflow run %s)", name, " (resumed)" if resumed else "", params, run_id)
    with store.tracked_run(setup.tracking_uri, run_id, failure_tags=_failure_verdict) as outcome:
        # The callback must be created here, inside the Tune session: it forwards rank 0's reports to Tune.
        result = fit(setup.run, cfg, setup.tracking_uri, run_id,
                     faults=setup.faults.for_trial(trial_number(name)), callbacks=[evaluation_report()])  # fmt: skip
        final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        if METRIC not in final:
            raise RuntimeError(f"{name}: training ended without an evaluation (no checkpoint with {METRIC})")
        best = best_checkpoint(result)
        if best is not None:
            client.set_tag(run_id, names.BEST_CHECKPOINT_TAG, best.path)
        # The last evaluation once more, from the trial itself: Tune requires val/AP in a trial's last result, and
        # a trial whose Train run had already finished (resumed search) reports nothing through the callback.
        tune.report({**final, names.TRIAL_FINISHED_KEY: 1})
        outcome.tags[names.TRIAL_STATUS_TAG] = status.COMPLETED


# (parent run id, trial id) → the status `TrialRunStatus` left on that trial's child run as the trial ended, until
# `recorded_status` reads it. Module state because its writer and its reader are built apart and share only these
# ids (the callback with the Tuner, or unpickled with a restored one; the console's `recorded` in tuning/experiment.py
# from the search's ids). Tune calls the console's TrialLines after TrialRunStatus (`tuning.console.configure` appends
# it last), so the console finds the entry and MLflow is searched once per ended trial.
_closed_status: dict[tuple[str, str], str | None] = {}
_NOT_CLOSED = object()  # no entry: None is a status too (the trial never created its run)


class TrialRunStatus(tune.Callback):
    """On the search driver: closes the MLflow child run of every trial that ends, the one lookup of that run there.

    A trial that ASHA stops is ended by Tune from outside (its process goes away mid-``fit``), so its child run
    would stay RUNNING forever; errors that kill the trial's process (out of memory) likewise skip its own
    bookkeeping. Trials that end normally have already closed their run; setting the same status again is harmless.
    The status the run holds afterwards is kept for `recorded_status`.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id

    def _close(self, trial: Any, ended: str, run_status: str) -> None:
        key = (self.parent_run_id, trial.trial_id)
        _closed_status.pop(key, None)  # an earlier attempt's (a trial resumed in this process): never served now
        try:
            _closed_status[key] = self._close_run(trial.trial_id, ended, run_status)
        except Exception:  # bookkeeping must never end the search; recorded_status then looks the run up itself
            logger.exception("could not close the MLflow run of trial %s", trial.trial_id)

    def _close_run(self, trial_id: str, ended: str, run_status: str) -> str | None:
        """Set `ended` on the trial's child run unless the trial recorded a failure itself; the status it holds now
        (None: the trial never created its run)."""
        run_id = find_child_run(self.tracking_uri, self.experiment, self.parent_run_id, trial_id)
        if run_id is None:
            return None
        client = MlflowClient(self.tracking_uri)
        recorded = client.get_run(run_id).data.tags.get(names.TRIAL_STATUS_TAG)
        if recorded in status.FAILURES:
            return recorded  # the trial's own verdict (diverged or failed) wins; it closed its run itself
        client.set_tag(run_id, names.TRIAL_STATUS_TAG, ended)
        client.set_terminated(run_id, run_status)
        return ended

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        finished = names.TRIAL_FINISHED_KEY in (trial.last_result or {})
        self._close(trial, status.COMPLETED if finished else status.STOPPED, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, status.FAILED, "FAILED")
