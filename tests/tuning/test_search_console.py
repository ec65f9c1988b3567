"""The search's console on hand-made trials and results, without Ray: one line per ended trial (what the Tune
callback logs), Tune's own output switched off unless --verbose, and the final summary. The real search's
output is checked in test_tuning_search.py (the CLI driver, killed, then the resumed search)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
from ray import tune

from pipelines import names
from tuning import console as tc
from tuning import results as res
from tuning.config import load_search_config
from tuning.experiment import SearchOutcome, base_values, summary, trial_lines
from tuning.space import DIMENSIONS

REPO = Path(__file__).resolve().parents[2]
DIMS = [d for d in DIMENSIONS if d.name != "lr"]
NAMES = ["gamma", "alpha", "prior"]
DIVERGED = "NonFiniteLossError: non-finite loss at step 0: rank 0: loss=nan"
ROWS = [
    res.TrialRow(
        "trial_000_aa", "aa", {"gamma": 2.0, "alpha": 0.25, "prior": 0.01}, 0.12, 2, "completed", "", ["c"], ap50=0.25
    ),
    res.TrialRow(
        "trial_001_bb", "bb", {"gamma": 4.5, "alpha": 0.8, "prior": 0.15}, 0.31, 1, "stopped", "", ["c"], ap50=0.5
    ),
    res.TrialRow("trial_002_cc", "cc", {"gamma": 0.5, "alpha": 0.5, "prior": 0.002}, None, 0, "diverged", DIVERGED, []),
]


def test_trial_line_shows_hyperparameters_aps_and_how_the_trial_ended():
    line = tc.trial_line(ROWS[0], NAMES)
    assert line.split() == ["trial_000_aa", "completed", "gamma=2", "alpha=0.25", "prior=0.01", "val/AP", "0.1200",
                            "AP50", "0.2500", "2", "epochs"]  # fmt: skip
    assert "stopped early (ASHA)" in tc.trial_line(ROWS[1], NAMES) and "1 epoch" in tc.trial_line(ROWS[1], NAMES)
    first, second = tc.trial_line(ROWS[2], NAMES, DIVERGED).splitlines()
    assert first.split()[1] == "diverged" and "val/AP -" in " ".join(first.split()) and second.strip() == DIVERGED
    assert tc.trial_line(ROWS[0], [*NAMES, "lr"]) == tc.trial_line(ROWS[0], NAMES)  # a value it lacks is left out


class FakeTrial:
    """What TrialLines reads from a Tune trial on the driver."""

    def __init__(self, name: str, config: dict, last_result: dict, error_file: str | None = None, best_ap=None):
        self.name, self.trial_id, self.config, self.last_result = name, name.split("_")[-1], config, last_result
        self.error_file = error_file
        self.path = f"/storage/focal_study/{name}_gamma=2"  # Tune's trial folder: its name plus the config
        self.metric_analysis = {} if best_ap is None else {names.VAL_AP: {"max": best_ap, "last": best_ap}}

    def get_error(self):
        return None

    def __str__(self) -> str:
        return self.name


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="retina.tune")
    recorded = {"cc": "failed", "dd": "diverged"}  # what each trial recorded in its MLflow run
    callback = tc.TrialLines(NAMES, {"gamma": 2.0, "alpha": 0.25, "prior": 0.01}, "s3://bucket/runs/focal_study",
                             recorded.get)  # fmt: skip
    return callback, caplog


def test_one_line_per_ended_trial_with_its_best_evaluation(lines, tmp_path):
    callback, caplog = lines
    done = FakeTrial("trial_000_aa", {"gamma": 0.0}, {names.EPOCH: 2, names.TRIAL_FINISHED_KEY: 1})
    for ap, ap50 in ((0.1, 0.2), (0.3, 0.45), (0.25, 0.5)):  # the best is the second evaluation
        callback.on_trial_result(0, [], done, {names.VAL_AP: ap, names.VAL_AP50: ap50, names.EPOCH: 1})
    callback.on_trial_result(0, [], done, {names.EPOCH: 1})  # a report without val/AP changes nothing
    callback.on_trial_complete(0, [], done)
    stopped = FakeTrial("trial_001_bb", {"gamma": 1.0}, {names.EPOCH: 1}, best_ap=0.2)  # restored: known by its max
    callback.on_trial_complete(0, [], stopped)
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at 2026)\nray::ImplicitFunc.train()\n  File ...\nValueError: bad batch\n")
    failed = FakeTrial("trial_002_cc", {"gamma": 3.0}, {}, error_file=str(error))
    callback.on_trial_error(0, [], failed)
    error.write_text(f"Failure # 1\nTraceback ...\npipelines.training.run.{DIVERGED}\n")
    callback.on_trial_error(0, [], FakeTrial("trial_003_dd", {"gamma": 5.0}, {}, error_file=str(error)))

    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4
    assert logged[0].split()[:5] == ["trial_000_aa", "completed", "gamma=0", "alpha=0.25", "prior=0.01"]
    assert "val/AP 0.3000  AP50 0.4500  2 epochs" in logged[0]
    assert "stopped early (ASHA)" in logged[1] and "val/AP 0.2000  AP50 -" in logged[1]
    head, detail = logged[2].splitlines()
    assert "failed (ValueError)" in head and "gamma=3" in head
    assert detail.strip() == "ValueError: bad batch  (traceback: s3://bucket/runs/focal_study/" \
                             "trial_002_cc_gamma=2/error.txt)"  # fmt: skip
    assert logged[3].splitlines()[0].split()[1] == "diverged" and logged[3].splitlines()[1].strip() == DIVERGED


def test_a_broken_trial_object_costs_its_line_not_the_search(lines):
    callback, caplog = lines
    callback.on_trial_complete(0, [], object())  # nothing Tune would pass; must not raise
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_tune_output_is_off_unless_verbose_and_keeps_the_users_choice(monkeypatch, caplog):
    for key in tc.QUIET_TUNE_ENV:
        monkeypatch.delenv(key, raising=False)
    tune_logger = logging.getLogger("ray.tune.tune")
    with tc.tune_output(verbose=False):
        assert {k: os.environ[k] for k in tc.QUIET_TUNE_ENV} == tc.QUIET_TUNE_ENV
        tune_logger.error("Trials did not complete: [trial_001_bb]")  # each already has its line
        tune_logger.error("Experiment state snapshotting failed")  # other errors still show
        logging.getLogger("ray.tune.utils.util").warning(
            "The `on_step_begin` operation took 1.005 s, which may be a performance bottleneck."
        )  # Tune timing its own loop
    assert not set(tc.QUIET_TUNE_ENV) & set(os.environ)  # restored after the fit
    with tc.tune_output(verbose=True):
        assert not set(tc.QUIET_TUNE_ENV) & set(os.environ)
        tune_logger.error("Trials did not complete: [trial_002_cc]")
    assert [r.getMessage() for r in caplog.records] == [
        "Experiment state snapshotting failed", "Trials did not complete: [trial_002_cc]"
    ]  # fmt: skip
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with tc.tune_output(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert (tc.tune_verbosity(False), tc.tune_verbosity(True)) == (0, None)


def test_configure_sets_verbosity_and_replaces_the_lines_of_a_restored_tuner():
    class Other(tune.Callback):
        pass

    keep, stale, fresh = Other(), tc.TrialLines(NAMES, {}, "old"), tc.TrialLines(NAMES, {}, "new")
    run_config = tune.RunConfig(callbacks=[keep, stale], verbose=None)  # as pickled when the search began

    class Restored:
        class _local_tuner:  # noqa: N801  (Ray's attribute name)
            @staticmethod
            def get_run_config():
                return run_config

    tc.configure(Restored(), fresh, verbose=False)
    assert run_config.verbose == 0 and run_config.callbacks == [keep, fresh]
    tc.configure(Restored(), fresh, verbose=True)
    assert run_config.verbose is None and run_config.callbacks == [keep, fresh]


def test_lines_show_pi_when_only_gamma_and_alpha_are_searched_and_lr_when_searched():
    grid = load_search_config(REPO / "configs" / "focal_study.yaml")
    callback = trial_lines(grid, "runs/focal_study")
    assert callback.names == ["gamma", "alpha", "prior"] and callback.base["prior"] == grid.model.head.prior
    trial = FakeTrial("trial_000_aa", {"gamma": 2.0, "alpha": 0.25}, {names.TRIAL_FINISHED_KEY: 1})
    assert callback.row(trial, "completed", "").params == {"gamma": 2.0, "alpha": 0.25, "prior": grid.model.head.prior}
    with_lr = load_search_config(REPO / "configs" / "smoke.yaml", ["tuning.lr.kind=loguniform"])
    assert trial_lines(with_lr, "x").names == ["gamma", "alpha", "prior", "lr"]
    assert base_values(with_lr)["lr"] == with_lr.train.base_lr


def test_summary_sorts_by_ap_names_the_best_trial_and_the_parent_run():
    table = res.format_table(res.by_ap(ROWS), DIMS)
    outcome = SearchOutcome("runs/smoke_search", "abc123", "sqlite:////tmp/x/mlflow.db", ROWS, table, ROWS[1], "r1",
                            None, None, False, 95.0, "", "retina-search", "7")  # fmt: skip
    text = summary(outcome)
    lines = text.splitlines()
    assert lines[0] == "search done in 1m35s: 3 trials, 1 completed, 1 stopped early (ASHA), 1 diverged"
    assert [line.split()[0] for line in lines[4:7]] == ["trial_001_bb", "trial_000_aa", "trial_002_cc"]
    assert "best trial:              trial_001_bb (gamma=4.5 alpha=0.8 prior=0.15) val/AP=0.3100 AP50=0.5000" in text
    assert "MLflow parent run:       abc123 in experiment 'retina-search' at sqlite:////tmp/x/mlflow.db" in text
    assert "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in text
    assert "http://127.0.0.1:5000/#/experiments/7/runs/abc123" in text
    assert "search folder (restore): runs/smoke_search" in text
    repo_store = summary(dataclasses.replace(outcome, tracking_uri=f"sqlite:///{REPO / 'mlflow.db'}"))
    assert f"make ui (in {REPO}), then http://127.0.0.1:5000/#/experiments/7/runs/abc123" in repo_store


def test_an_interrupted_search_says_how_to_continue_and_names_no_best_trial():
    table = res.format_table(res.by_ap(ROWS), DIMS)
    outcome = SearchOutcome("runs/smoke_search", "abc123", "sqlite:////tmp/x/mlflow.db", ROWS, table, None, None,
                            None, None, False, 95.0, "", "retina-search", "7", interrupted=True)  # fmt: skip
    text = summary(outcome)
    assert text.splitlines()[0].startswith("search interrupted after 1m35s: 3 trials")
    assert "run the same command again to continue the search" in text and "best trial" not in text
    assert "search folder (restore): runs/smoke_search" in text
