"""One Tune trial = one multi-worker TorchTrainer run (Ray Train V2) with the trial's γ, α, π (, lr).

The trial function is the Train driver: it builds the training config for its hyperparameters, opens its MLflow
child run (nested under the search's parent run through the ``mlflow.parentRunId`` tag), and runs the same
TorchTrainer and per-worker loop as ``pipelines/train.py``. Rank 0's report of every evaluation reaches Tune
through `EvaluationReport`, so ASHA can stop a weak trial between epochs.

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
from ray.tune.integration.ray_train import TuneReportCallback

from cluster import s3
from pipelines import tracking
from pipelines.train import NonFiniteLossError, build_datasets, build_trainer
from pipelines.train_loop import NONFINITE_KEY
from retina.config import Config, config_from_dict, flatten, to_dict
from tuning.space import METRIC, apply_hyperparameters

logger = logging.getLogger("retina.tune")

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
TRIAL_ID_TAG = "retina.tune.trial_id"
STATUS_TAG = "retina.tune.status"  # completed | stopped (ASHA) | failed; set when the trial ends
BEST_CHECKPOINT_TAG = "retina.best_checkpoint"
ERROR_TAG = "retina.error"
# In the trial's own last report only: the trial ran to its end. Tune marks a scheduler-stopped trial's last
# result done=True too, so `done` cannot tell "completed" from "stopped by ASHA"; this key can.
FINISHED_KEY = "trial/finished"


@dataclass
class TrialSetup:
    """What every trial shares; handed to the trials through `tune.with_parameters` (the object store)."""

    base: dict[str, Any]  # the base Config as a dict, local paths absolute (trials run in other directories)
    trials_dir: str  # Train runs of the trials: <trials_dir>/<trial id> (local path or s3://)
    tracking_uri: str
    experiment: str
    parent_run_id: str
    label_map: list[dict[str, Any]]


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
    """The MLflow run key of a trial: its Train run folder, as `pipelines.train.run` keys a training run."""
    return s3.join(trials_dir, trial_name)


def find_child_run(tracking_uri: str, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run id of a trial of this search, or None when the trial never got as far as creating it."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


class EvaluationReport(TuneReportCallback):
    """Forwards rank 0's evaluation reports to Tune; drops reports without val/AP.

    The training loop's last report of a diverged run carries ``error/nonfinite`` and no val/AP. Tune treats a
    result without the searched metric as a bug and ends the whole search (strict metric checking), so that
    report stays in Train: the trial function raises on it after ``fit`` instead, failing only this trial.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_config(setup: TrialSetup, params: dict[str, Any], trial_name: str, nan: bool) -> Config:
    """The trial's training config: its hyperparameters, its own Train run name and folder."""
    cfg = apply_hyperparameters(config_from_dict(setup.base), params)
    run = dataclasses.replace(cfg.run, name=trial_name, storage_path=setup.trials_dir)
    train = dataclasses.replace(cfg.train, nan_at_step=0) if nan else cfg.train
    return dataclasses.replace(cfg, run=run, train=train)


def _best_checkpoint(result: ray.train.Result) -> ray.train.Checkpoint | None:
    scored = [(m.get(METRIC, -1.0), c) for c, m in (result.best_checkpoints or []) if m]
    return max(scored, key=lambda t: t[0])[1] if scored else result.checkpoint


def divergence(result: ray.train.Result) -> str | None:
    """The non-finite-loss message of a run that diverged (rank 0's return value carries it), else None.

    (Not ``Result.metrics``: in Train V2 those are the latest *checkpoint's* metrics, and the loop's divergence
    report has no checkpoint.)
    """
    returned = result.return_value
    if isinstance(returned, dict) and returned.get(NONFINITE_KEY):
        return str(returned[NONFINITE_KEY])
    return None


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: one TorchTrainer run; raises when it diverges or fails."""
    ctx = tune.get_context()
    trial_id, name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(setup, params, name, nan=trial_number(name) in setup.base["tuning"]["nan_trials"])
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars drown the trial logs

    run_params = {**flatten(to_dict(cfg)), **{k: v for k, v in params.items()}}
    run_id, resumed = tracking.start_or_resume_run(
        setup.tracking_uri, setup.experiment, name, child_run_key(setup.trials_dir, name), run_params
    )
    client = MlflowClient(setup.tracking_uri)
    for key, value in ((PARENT_TAG, setup.parent_run_id), (TRIAL_ID_TAG, trial_id), (STATUS_TAG, "running")):
        client.set_tag(run_id, key, value)
    if resumed and ERROR_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, ERROR_TAG)  # an earlier attempt's error, not this one's
    logger.info("%s%s: %s (MLflow run %s)", name, " (resumed)" if resumed else "", params, run_id)
    try:
        train_ds, val_ds = build_datasets(cfg)  # the same datasets as pipelines/train.py
        loop_config = {
            "config": to_dict(cfg),
            "tracking_uri": setup.tracking_uri,
            "mlflow_run_id": run_id,
            "label_map": setup.label_map,
        }
        trainer = build_trainer(cfg, loop_config, {"train": train_ds, "val": val_ds})
        # build_trainer takes no callbacks: add Tune's bridge to the run config it built (the trainer reads
        # run_config.callbacks when fit() starts). The callback must be created here, inside the Tune session.
        trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), EvaluationReport()]
        result = trainer.fit()
        message = divergence(result)
        if message:
            raise NonFiniteLossError(message)
        final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        if METRIC not in final:
            raise RuntimeError(f"{name}: training ended without an evaluation (no checkpoint with {METRIC})")
        best = _best_checkpoint(result)
        if best is not None:
            client.set_tag(run_id, BEST_CHECKPOINT_TAG, best.path)
        # The last evaluation once more, from the trial itself: Tune requires val/AP in a trial's last result, and
        # a trial whose Train run had already finished (resumed search) reports nothing through the callback.
        tune.report({**final, FINISHED_KEY: 1})
    except BaseException as exc:
        client.set_tag(run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:5000])
        client.set_tag(run_id, STATUS_TAG, "failed")
        tracking.end_run(setup.tracking_uri, run_id, "FAILED")
        raise
    client.set_tag(run_id, STATUS_TAG, "completed")
    tracking.end_run(setup.tracking_uri, run_id, "FINISHED")


class TrialRunStatus(tune.Callback):
    """On the search driver: closes the MLflow child run of every trial that ends.

    A trial that ASHA stops is ended by Tune from outside (its process goes away mid-``fit``), so its child run
    would stay RUNNING forever; errors that kill the trial's process (out of memory) likewise skip its own
    bookkeeping. Trials that end normally have already closed their run; setting the same status again is harmless.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id

    def _close(self, trial: Any, status: str, run_status: str) -> None:
        try:
            run_id = find_child_run(self.tracking_uri, self.experiment, self.parent_run_id, trial.trial_id)
            if run_id is None:
                return
            client = MlflowClient(self.tracking_uri)
            if status != "failed" and client.get_run(run_id).data.tags.get(STATUS_TAG) == "failed":
                return  # the trial's own verdict wins
            client.set_tag(run_id, STATUS_TAG, status)
            client.set_terminated(run_id, run_status)
        except Exception:  # bookkeeping must never end the search
            logger.exception("could not close the MLflow run of trial %s", trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        finished = FINISHED_KEY in (trial.last_result or {})
        self._close(trial, "completed" if finished else "stopped", "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "failed", "FAILED")
