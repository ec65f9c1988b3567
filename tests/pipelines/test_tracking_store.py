"""The MLflow store (pipelines/tracking/store.py) against a real embedded SQLite store: where it is, one run per
run key (found again on resume), and `tracked_run`, the one owner of a run's final status. Fast: no Ray."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from pipelines import names
from pipelines.tracking import store


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One store for the module (creating its tables takes seconds); each test makes its own runs in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


def _new_run(uri: str) -> str:
    key = f"runs/{uuid.uuid4().hex}"
    run_id, resumed = store.start_or_resume_run(uri, "exp", "x", key, {"train.base_lr": 0.01, "lst": [1, 2]})
    assert not resumed and MlflowClient(uri).get_run(run_id).data.tags[names.RUN_KEY_TAG] == key
    return run_id


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"  # absolute: workers run elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.resolve_tracking_uri("") == "http://127.0.0.1:5000"
    assert store.resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"


def test_one_run_per_run_key_resumed_with_new_params_only(tracking_uri):
    run_id = _new_run(tracking_uri)
    client = MlflowClient(tracking_uri)
    key = client.get_run(run_id).data.tags[names.RUN_KEY_TAG]
    run = client.get_run(run_id)
    assert run.data.params == {"train.base_lr": "0.01", "lst": "[1, 2]"}
    client.set_terminated(run_id, "FAILED")

    again, resumed = store.start_or_resume_run(tracking_uri, "exp", "x", key, {"train.base_lr": 0.5, "new": 1})
    assert (again, resumed) == (run_id, True)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # set back to RUNNING for the resumed attempt
    assert run.data.params["train.base_lr"] == "0.01" and run.data.params["new"] == "1"  # params are immutable
    other, resumed = store.start_or_resume_run(tracking_uri, "exp", "x", key + "-other", {})
    assert other != run_id and not resumed


def test_tracked_run_finished_with_the_block_s_tags(tracking_uri):
    run_id = _new_run(tracking_uri)
    with store.tracked_run(tracking_uri, run_id, failure_tags={"only": "on failure"}) as status:
        assert status.status == "FINISHED"
        status.tags["result"] = "good"
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["result"] == "good"
    assert names.ERROR_TAG not in run.data.tags and "only" not in run.data.tags


def test_tracked_run_status_chosen_by_the_block(tracking_uri):
    run_id = _new_run(tracking_uri)
    with store.tracked_run(tracking_uri, run_id) as status:
        status.status = "FAILED"  # e.g. a search in which no trial finished: no exception, still a failure
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "FAILED"


def test_tracked_run_failed_with_the_error_and_failure_tags(tracking_uri):
    run_id = _new_run(tracking_uri)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
        with store.tracked_run(tracking_uri, run_id, failure_tags={names.TRIAL_STATUS_TAG: "failed"}) as status:
            status.tags["result"] = "never set"
            raise FloatingPointError("non-finite loss at step 5")
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags[names.ERROR_TAG] == "FloatingPointError: non-finite loss at step 5"
    assert run.data.tags[names.TRIAL_STATUS_TAG] == "failed"
    assert "result" not in run.data.tags  # the block's tags are for a normal end only


def test_tracked_run_killed_on_ctrl_c(tracking_uri):
    run_id = _new_run(tracking_uri)
    with pytest.raises(KeyboardInterrupt):
        with store.tracked_run(tracking_uri, run_id, failure_tags={"only": "on failure"}):
            raise KeyboardInterrupt
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert names.ERROR_TAG not in run.data.tags and "only" not in run.data.tags


def test_metric_history_sorted_by_step_and_run_logger_skips_logged_steps(tracking_uri):
    from pipelines.tracking.logger import RunLogger

    run_id = _new_run(tracking_uri)
    logger = RunLogger(tracking_uri, run_id, enabled=True)
    logger.log_metrics({names.TRAIN_LOSS: 1.0}, step=2)
    logger.log_metrics({names.TRAIN_LOSS: 2.0, names.TRAIN_LR: float("nan")}, step=4)  # NaN is never sent
    logger.log_metrics({names.TRAIN_LOSS: 3.0}, step=3)  # below what the run holds: skipped
    # a restarted worker repeats steps: a fresh logger finds what the run already holds and skips them
    restarted = RunLogger(tracking_uri, run_id, enabled=True)
    restarted.log_metrics({names.TRAIN_LOSS: 9.0}, step=4)
    restarted.log_metrics({names.TRAIN_LOSS: 0.5}, step=6)
    assert store.metric_history(tracking_uri, run_id, names.TRAIN_LOSS) == [(2, 1.0), (4, 2.0), (6, 0.5)]
    assert store.metric_history(tracking_uri, run_id, names.TRAIN_LR) == []
    RunLogger(tracking_uri, run_id, enabled=False).log_metrics({names.TRAIN_LOSS: 7.0}, step=8)  # not rank 0
    assert len(store.metric_history(tracking_uri, run_id, names.TRAIN_LOSS)) == 3


def test_a_sqlite_stores_artifacts_live_beside_its_database(tmp_path, monkeypatch):
    """Not in ./mlruns of whatever directory the command ran in (MLflow's default), which littered checkouts."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment(store.experiment_id(client, "leak-check"))
    assert exp.artifact_location == (tmp_path / "mlruns").as_uri()
    assert store.experiment_id(client, "leak-check") == exp.experiment_id  # found again, not created twice
    assert not (tmp_path / "elsewhere" / "mlruns").exists()
