"""End to end: a 3-trial ASHA search on the smoke config, with real Ray Tune/Train and MLflow.

One scenario covers the fault cases, because every trial costs real training time on this machine:
the search runs as a separate driver process on the test's Ray cluster; trial 1 is forced to diverge
(``RETINA_TEST_FAULTS={"nan_trials": [1]}`` in the environment of either driver); the driver is SIGKILLed as soon
as Tune has recorded the first trial as finished; the same search is then resumed in this process. Checked: the
finished trial is not run again, the diverged trial is recorded as failed while the others complete, the MLflow
parent/child runs, the results artifacts, and the registered best model with the champion alias.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import names
from pipelines.training.faults import ENV as FAULTS_ENV
from tuning import results as res
from tuning.config import load_search_config
from tuning.experiment import run_search

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
NAME = "tune_test"
FAULTS = json.dumps({"nan_trials": [1]})  # trial 1 diverges from its first step


def _overrides(tmp_path: Path) -> list[str]:
    data = REPO / "data" / "smoke"  # the smoke sample data, shared with the other smoke tests
    return [
        f"data.root={data}",
        f"data.train_shards={data / 'shards' / 'train'}",
        f"data.val_shards={data / 'shards' / 'val'}",
        # One DDP worker per trial keeps the test within its time budget on 2 cores (Ray Data's decode tasks need
        # the CPUs left over); the multi-worker path is the same code with scaling.num_workers > 1.
        "scaling.num_workers=1",
        "data.batch_size=8",  # 2 steps per epoch on the 16 smoke images
        "train.max_steps=4",  # 2 epochs: ASHA has a rung after epoch 1
        "train.num_logged_images=0",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=retina-tune-test",
        "tracking.registered_model_name=retinanet-tune-test",
        "tracking.alias=champion",
        f"tuning.name={NAME}",
        "tuning.num_samples=3",
    ]


# The console's line for an ended trial (tuning/console.py): its name and how it ended, then its hyperparameters.
TRIAL_LINE = re.compile(r"(trial_\d{3}_\w+)  (.+?) +gamma=\S+ alpha=\S+ prior=\S+  val/AP ")


def _finished_trials(experiment: Path) -> int:
    states = sorted(experiment.glob("experiment_state-*.json"))
    return states[-1].read_text().count('\\"status\\": \\"TERMINATED\\"') if states else 0


@pytest.mark.slow
def test_search_with_failed_trial_killed_driver_and_resume(ray_local, tmp_path, monkeypatch, caplog, capsys):
    overrides = _overrides(tmp_path)
    experiment = tmp_path / "runs" / NAME
    log = (tmp_path / "driver.log").open("w")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1",
           FAULTS_ENV: FAULTS}  # fmt: skip
    cmd = [sys.executable, str(REPO / "tuning" / "search.py"), "--config", SMOKE, "--scheduler", "asha"]
    driver = subprocess.Popen(cmd + [a for o in overrides for a in ("--set", o)], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while _finished_trials(experiment) < 1:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(1)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-search, as on a lost head node
        driver.wait()
    first = next(experiment.glob("trial_000_*/progress.csv"))
    before = first.read_bytes()

    cfg = load_search_config(SMOKE, overrides)
    monkeypatch.setenv(FAULTS_ENV, FAULTS)  # this process is the resumed search's driver
    caplog.set_level(logging.INFO, logger="retina.tune")
    outcome = run_search(cfg)  # same name and storage: restores the killed search

    # the search is complete; the finished trial was kept, not run again
    assert outcome.resumed
    rows = {r.name.split("_")[1]: r for r in outcome.rows}
    assert sorted(rows) == ["000", "001", "002"]
    assert first.read_bytes() == before
    assert rows["000"].status == "completed" and rows["000"].epochs == 2
    # the diverged trial ended alone, as failed; the search went on
    assert rows["001"].status == "diverged" and "NonFiniteLossError" in rows["001"].error
    assert rows["002"].status in ("completed", "stopped") and rows["002"].best_ap is not None
    assert outcome.best is not None and outcome.best.name in (rows["000"].name, rows["002"].name)

    # the console: a line per trial as it ended, in whichever driver it ended (the restored search too), saying
    # how it ended; none of Tune's own tables (quiet by default in both drivers)
    first_driver = (tmp_path / "driver.log").read_text()
    ended = TRIAL_LINE.findall(first_driver) + TRIAL_LINE.findall(caplog.text)
    last_state = {name: state.strip() for name, state in ended}
    assert last_state == {r.name: res.end_state(r) for r in outcome.rows}, (first_driver[-3000:], caplog.text)
    assert last_state[rows["001"].name] == "diverged"
    for tune_table in ("Trial status", "== Status ==", "Configuration for experiment"):
        assert tune_table not in first_driver + capsys.readouterr().out, tune_table

    # MLflow: a parent run with one nested child per trial
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.`{names.MLFLOW_PARENT_TAG}` = '{outcome.parent_run_id}'")
    by_name = {c.info.run_name.split("_")[1]: c for c in children}
    assert sorted(by_name) == ["000", "001", "002"]
    for number, child in by_name.items():
        row = rows[number]
        for key in ("gamma", "alpha", "prior"):
            assert float(child.data.params[key]) == pytest.approx(row.params[key])
    assert by_name["001"].info.status == "FAILED" and by_name["001"].data.tags[names.TRIAL_STATUS_TAG] == "diverged"
    assert "non-finite" in by_name["001"].data.tags[names.ERROR_TAG]
    assert by_name["000"].info.status == "FINISHED" and names.VAL_AP in by_name["000"].data.metrics

    # results table and plot on the parent run
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "search")}
    assert {"search/results.csv", "search/val_AP_vs_hyperparameters.png"} <= artifacts
    table = client.download_artifacts(outcome.parent_run_id, "search/results.csv", str(tmp_path))
    with open(table) as f:
        assert [r["status"] for r in csv.DictReader(f)][1] == "diverged"

    # the best trial's model is registered from its child run, and took the (first) champion alias
    champion = client.get_model_version_by_alias("retinanet-tune-test", "champion")
    best_child = by_name[outcome.best.name.split("_")[1]]
    assert champion.tags[names.VERSION_RUN_ID_TAG] == outcome.best_run_id == best_child.info.run_id
    assert parent.data.tags[names.CHAMPION_TAG_PREFIX + "moved"] == "true"
    assert parent.data.tags[names.REGISTERED_VERSION_TAG] == f"retinanet-tune-test/{champion.version}"
    assert parent.data.tags[names.BEST_RUN_ID_TAG] == outcome.best_run_id
