"""End to end: the γ × α study preset (configs/focal_study.yaml) as a 3-point grid under ASHA on tiny data, through
tuning/search.py, with real Ray Tune/Train and MLflow, then the loss analysis of the model it registers.

One scenario covers the search's faults and the study's outputs, because every trial costs real training time on
this machine: the search runs as a separate driver process on the test's Ray cluster; trial 1 (γ = 2) is forced
to diverge (``RETINA_TEST_FAULTS={"nan_trials": [1]}`` in the environment of either driver); the driver is
SIGKILLed as soon as Tune has recorded the first trial as finished; the same search is then resumed in this
process. Checked: the finished trial is not run again, the diverged trial is recorded as diverged while the others
complete, the console of both drivers, the MLflow parent/child runs with each trial's step-0 loss, the results
and the paper-layout artifacts (the diverged cell included), the registered best model with the champion alias,
and `evaluate.py --loss-analysis` on that model.
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
from tuning.experiment import run_search, summary

REPO = Path(__file__).resolve().parents[2]
STUDY = str(REPO / "configs" / "focal_study.yaml")
NAME = "tune_test"
FAULTS = json.dumps({"nan_trials": [1]})  # trial 1 (γ = 2) diverges from its first step
GAMMAS = [0.0, 2.0, 5.0]


def _overrides(tmp_path: Path) -> list[str]:
    """The preset on 16 + 8 synthetic images, one worker per trial, 4 steps (two epochs: ASHA has a rung after
    the first)."""
    data = tmp_path / "data"
    return [
        f"data.root={data}",
        f"data.train_shards={data / 'shards' / 'train'}",
        f"data.val_shards={data / 'shards' / 'val'}",
        "data.synthetic_images=16",
        "data.synthetic_val_images=8",
        "data.batch_size=8",
        "data.val_batch_size=8",
        # One DDP worker per trial keeps the test within its time budget on 2 cores (Ray Data's decode tasks need
        # the CPUs left over); the multi-worker path is the same code with scaling.num_workers > 1.
        "scaling.num_workers=1",
        "train.max_steps=4",
        "train.eval_every_epochs=1",
        "train.num_logged_images=0",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=retina-tune-test",
        "tracking.registered_model_name=retinanet-tune-test",
        "tracking.alias=champion",
        f"tuning.name={NAME}",
        f"tuning.gamma.values={GAMMAS}",
        "tuning.alpha.values=[0.25]",
    ]


# The console's line for an ended trial (tuning/console.py): its name and how it ended, its γ, α, π, best val/AP.
TRIAL_LINE = re.compile(r"(trial_\d{3}_\w+)  (.+?) +gamma=(\S+) alpha=(\S+) prior=(\S+)  val/AP ")


def _finished_trials(experiment: Path) -> int:
    states = sorted(experiment.glob("experiment_state-*.json"))
    return states[-1].read_text().count('\\"status\\": \\"TERMINATED\\"') if states else 0


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


@pytest.mark.slow
def test_study_search_with_diverged_trial_killed_driver_resume_and_loss_analysis(
    ray_local, tmp_path, monkeypatch, caplog, capsys
):
    overrides = _overrides(tmp_path)
    experiment = tmp_path / "runs" / NAME
    log = (tmp_path / "driver.log").open("w")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "tuning" / "search.py"), "--config", STUDY, "--scheduler", "asha"]
    driver = subprocess.Popen(cmd + [a for o in overrides for a in ("--set", o)], cwd=tmp_path,
                              env={**env, FAULTS_ENV: FAULTS}, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
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

    cfg = load_search_config(STUDY, overrides)
    monkeypatch.setenv(FAULTS_ENV, FAULTS)  # this process is the resumed search's driver
    caplog.set_level(logging.INFO, logger="retina.tune")
    outcome = run_search(cfg)  # same name and storage: restores the killed search

    # the search is complete; the finished trial was kept, not run again
    assert outcome.resumed
    rows = {r.name.split("_")[1]: r for r in outcome.rows}
    assert sorted(rows) == ["000", "001", "002"]
    assert [rows[n].params["gamma"] for n in sorted(rows)] == GAMMAS  # the grid's points, in order
    assert first.read_bytes() == before
    assert rows["000"].status == "completed" and rows["000"].epochs == 2
    # the diverged trial ended alone, as diverged; the search went on
    assert rows["001"].status == "diverged" and "NonFiniteLossError" in rows["001"].error
    assert rows["002"].status in ("completed", "stopped") and rows["002"].best_ap is not None
    assert outcome.best is not None and outcome.best.name in (rows["000"].name, rows["002"].name)

    # the console: a line per trial as it ended, in whichever driver it ended (the restored search too), saying
    # how it ended, with its γ, α and π; none of Tune's own tables (quiet by default in both drivers); the summary
    # (what search.py prints): the trial table best val/AP first, the paper-layout grid, the best trial, MLflow
    first_driver = (tmp_path / "driver.log").read_text()
    ended = TRIAL_LINE.findall(first_driver) + TRIAL_LINE.findall(caplog.text)
    last_state = {name: state.strip() for name, state, *_ in ended}
    assert last_state == {r.name: res.end_state(r) for r in outcome.rows}, (first_driver[-3000:], caplog.text)
    assert last_state[rows["001"].name] == "diverged"
    assert sorted((float(g), float(a)) for _, _, g, a, _ in ended) == [(g, 0.25) for g in GAMMAS]
    assert all(float(prior) > 0 for *_, prior in ended)
    for tune_table in ("Trial status", "== Status ==", "Configuration for experiment"):
        assert tune_table not in first_driver + capsys.readouterr().out, tune_table
    shown = summary(outcome)
    header = next(i for i, line in enumerate(shown.splitlines()) if line.split()[:2] == ["trial", "gamma"])
    table = shown.splitlines()[header + 2 : header + 5]
    assert [line.split()[0] for line in table][:2] == [r.name for r in res.by_ap(outcome.rows)][:2]
    assert "gamma \\ alpha" in shown and "diverged" in shown, shown
    assert "best trial:" in shown and "MLflow parent run:" in shown and "MLflow UI:" in shown

    # MLflow: a parent run with one nested child per trial, each with its step-0 loss
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], f"tags.`{names.MLFLOW_PARENT_TAG}` = '{outcome.parent_run_id}'")
    by_name = {c.info.run_name.split("_")[1]: c for c in children}
    assert sorted(by_name) == ["000", "001", "002"]
    for number, child in by_name.items():
        row = rows[number]
        assert set(row.params) == {"gamma", "alpha"}  # the searched ones (π is fixed in the preset)
        for key in row.params:
            assert float(child.data.params[key]) == pytest.approx(row.params[key])
    assert by_name["001"].info.status == "FAILED" and by_name["001"].data.tags[names.TRIAL_STATUS_TAG] == "diverged"
    assert "non-finite" in by_name["001"].data.tags[names.ERROR_TAG]
    assert by_name["000"].info.status == "FINISHED" and names.VAL_AP in by_name["000"].data.metrics
    for number in ("000", "002"):  # the step-0 loss of each trial that trained, before any update
        run_id = by_name[number].info.run_id
        assert by_name[number].data.metrics[names.TRAIN_INITIAL_LOSS] > 0
        assert [h.step for h in client.get_metric_history(run_id, names.TRAIN_INITIAL_LOSS)] == [0]

    # results, the paper layout (rows γ, one column α; the diverged cell so marked) and the plots on the parent
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "search")}
    assert {"search/results.csv", "search/val_AP_vs_hyperparameters.png", "search/paper_table.txt",
            "search/paper_table.csv", "search/val_AP_heatmap.png"} <= artifacts  # fmt: skip
    with open(client.download_artifacts(outcome.parent_run_id, "search/results.csv", str(tmp_path))) as f:
        assert [r["status"] for r in csv.DictReader(f)][1] == "diverged"
    with open(client.download_artifacts(outcome.parent_run_id, "search/paper_table.csv", str(tmp_path))) as f:
        paper = list(csv.DictReader(f))
    assert [float(r["gamma"]) for r in paper] == GAMMAS
    assert [r["alpha=0.25 status"] for r in paper][:2] == ["completed", "diverged"]
    assert float(paper[0]["alpha=0.25 AP"]) >= 0

    # the best trial's model is registered from its child run, and took the (first) champion alias
    champion = client.get_model_version_by_alias("retinanet-tune-test", "champion")
    best_child = by_name[outcome.best.name.split("_")[1]]
    assert champion.tags[names.VERSION_RUN_ID_TAG] == outcome.best_run_id == best_child.info.run_id
    assert parent.data.tags[names.CHAMPION_TAG_PREFIX + "moved"] == "true"
    assert parent.data.tags[names.REGISTERED_VERSION_TAG] == f"retinanet-tune-test/{champion.version}"
    assert parent.data.tags[names.BEST_RUN_ID_TAG] == outcome.best_run_id

    # Figure 4 for the study's registered model: `evaluate.py --loss-analysis`, logged into its evaluation run
    model_uri = client.get_run(outcome.parent_run_id).data.tags[names.MODEL_URI_TAG]
    proc = _run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model", model_uri,
                 "--data", str(tmp_path / "data" / "shards" / "val"), "--loss-analysis", "--gammas", "0", "2"],
                tmp_path, {**env, "MLFLOW_TRACKING_URI": outcome.tracking_uri}, timeout=300)  # fmt: skip
    assert "Loss concentration" in proc.stdout and "negatives (N=" in proc.stdout, proc.stdout[-3000:]
    [evaluation] = client.search_runs([exp_id], "tags.`retina.task` = 'evaluation'")
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id, "loss_analysis")}
    assert logged == {"loss_analysis/loss_concentration.png", "loss_analysis/table.txt", "loss_analysis/result.json"}
    metrics = evaluation.data.metrics
    assert (
        metrics[names.loss_analysis_metric(2.0, "negative", 0.05)]
        > metrics[names.loss_analysis_metric(0.0, "negative", 0.05)]
    )
