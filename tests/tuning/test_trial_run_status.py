"""`TrialRunStatus` (the search driver's closing of each ended trial's MLflow child run) and `recorded_status` (what
the console's line asks next): one search for the child run per ended trial. Real MLflow in an embedded SQLite store;
no Ray cluster, no training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from pipelines import names
from tuning import status, trial
from tuning.trial import TrialRunStatus, recorded_status


@pytest.fixture
def search(tmp_path, monkeypatch):
    """A parent run, child runs made by `add(trial_id, recorded_status)`, and a count of the child-run searches."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("search", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id
    monkeypatch.setattr(trial, "_closed_status", {})  # the driver's process-wide state, fresh for each test
    searches: list[str] = []
    find = trial.find_child_run
    monkeypatch.setattr(trial, "find_child_run", lambda *args: searches.append(args[-1]) or find(*args))

    def add(trial_id: str, recorded: str) -> str:
        tags = {names.MLFLOW_PARENT_TAG: parent, names.TRIAL_ID_TAG: trial_id, names.TRIAL_STATUS_TAG: recorded}
        return client.create_run(exp, tags=tags).info.run_id

    callback = TrialRunStatus(uri, "search", parent)
    return SimpleNamespace(uri=uri, client=client, parent=parent, add=add, searches=searches, callback=callback)


def _recorded(search, trial_id: str) -> str | None:
    return recorded_status(search.uri, "search", search.parent, trial_id)


def test_a_failed_trials_own_verdict_is_kept_and_read_back_without_a_second_search(search):
    run_id = search.add("aa", status.DIVERGED)  # the trial closed its run itself
    search.callback.on_trial_error(0, [], SimpleNamespace(trial_id="aa"))
    assert _recorded(search, "aa") == status.DIVERGED and search.searches == ["aa"]
    run = search.client.get_run(run_id)
    assert run.data.tags[names.TRIAL_STATUS_TAG] == status.DIVERGED and run.info.status == "RUNNING"  # not touched
    assert _recorded(search, "aa") == status.DIVERGED and search.searches == ["aa", "aa"]  # read once, then MLflow


def test_a_trial_killed_before_its_bookkeeping_is_closed_as_failed(search):
    run_id = search.add("bb", status.RUNNING)  # its process died (out of memory): the run says running
    search.callback.on_trial_error(0, [], SimpleNamespace(trial_id="bb"))
    assert _recorded(search, "bb") == status.FAILED and search.searches == ["bb"]
    run = search.client.get_run(run_id)
    assert run.data.tags[names.TRIAL_STATUS_TAG] == status.FAILED and run.info.status == "FAILED"


def test_ended_trials_and_trials_without_a_run(search):
    stopped = search.add("cc", status.RUNNING)  # ASHA stopped it: no TRIAL_FINISHED_KEY in its last result
    search.callback.on_trial_complete(0, [], SimpleNamespace(trial_id="cc", last_result={"val/AP": 0.1}))
    assert search.client.get_run(stopped).data.tags[names.TRIAL_STATUS_TAG] == status.STOPPED
    search.callback.on_trial_error(0, [], SimpleNamespace(trial_id="dd"))  # never created its run
    assert _recorded(search, "dd") is None and search.searches == ["cc", "dd"]
    assert _recorded(search, "ee") is None and search.searches == ["cc", "dd", "ee"]  # not closed here: MLflow


def test_a_failed_close_leaves_the_lookup_to_recorded_status(search, monkeypatch):
    search.add("ff", status.DIVERGED)
    monkeypatch.setattr(search.callback, "_close_run", lambda *args: 1 / 0)  # MLflow unreachable, say
    search.callback.on_trial_error(0, [], SimpleNamespace(trial_id="ff"))  # logged, not raised
    assert _recorded(search, "ff") == status.DIVERGED and search.searches == ["ff"]


def test_an_interrupted_search_closes_its_unfinished_trials_runs_as_killed(search):
    running, finished = search.add("gg", status.RUNNING), search.add("hh", status.COMPLETED)
    search.client.set_terminated(finished, "FINISHED")
    trial.close_interrupted(search.uri, "search", search.parent, ["gg", "hh", "ii"])  # ii never created its run
    assert search.client.get_run(running).info.status == "KILLED"
    assert search.client.get_run(finished).info.status == "FINISHED"  # an ended trial's run is left as it is
    assert search.searches == ["gg", "hh", "ii"]
