"""Test-only fault injection (pipelines/training/faults.py): read from ``RETINA_TEST_FAULTS`` by the driver, never
from the run config; handed to the workers and, in a search, to each trial."""

from __future__ import annotations

import json

import pytest

from pipelines.training.faults import ENV, Faults


def test_no_variable_means_no_faults(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert Faults.from_env() == Faults()
    monkeypatch.setenv(ENV, "")
    assert Faults.from_env() == Faults()
    Faults().maybe_fail(-1, 0, 1)  # the defaults never fire, not even at step -1


def test_from_env_parses_the_json(monkeypatch, tmp_path):
    marker = tmp_path / "failed_once"
    monkeypatch.setenv(ENV, json.dumps({"fail_at_step": 5, "fail_marker": str(marker), "nan_at_step": 7}))
    assert Faults.from_env() == Faults(fail_at_step=5, fail_marker=str(marker), nan_at_step=7)
    monkeypatch.setenv(ENV, json.dumps({"nan_trials": [1, 3]}))
    assert Faults.from_env().nan_trials == [1, 3]


def test_a_failure_needs_its_marker(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"fail_at_step": 5}))
    with pytest.raises(ValueError, match=f"{ENV}: fail_marker is required with fail_at_step"):
        Faults.from_env()


def test_unknown_fault_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV, json.dumps({"nan_at_stpe": 5}))
    with pytest.raises(TypeError, match="nan_at_stpe"):
        Faults.from_env()


def test_for_trial_makes_only_the_listed_trials_diverge_from_the_start():
    faults = Faults(nan_trials=[1])
    assert faults.for_trial(1).nan_at_step == 0
    assert faults.for_trial(0) == faults and faults.for_trial(2).nan_at_step == -1
    assert faults.nan_at_step == -1  # the search's own faults are unchanged


def test_maybe_fail_raises_once_on_one_rank(tmp_path):
    marker = tmp_path / "sub" / "failed_once"
    faults = Faults(fail_at_step=5, fail_marker=str(marker))
    faults.maybe_fail(4, 1, 2)  # not the step
    faults.maybe_fail(5, 0, 2)  # not the rank: rank 1 of a 2-worker group
    assert not marker.exists()
    with pytest.raises(RuntimeError, match=f"injected failure at step 5 on rank 1 \\({ENV} fail_at_step\\)"):
        faults.maybe_fail(5, 1, 2)
    assert marker.read_text() == "failed once at step 5 on rank 1\n"
    faults.maybe_fail(5, 1, 2)  # the restarted run passes the same step: the marker says it already failed


def test_maybe_fail_with_one_worker_uses_rank_0(tmp_path):
    faults = Faults(fail_at_step=0, fail_marker=str(tmp_path / "m"))
    with pytest.raises(RuntimeError, match="at step 0 on rank 0"):
        faults.maybe_fail(0, 0, 1)
