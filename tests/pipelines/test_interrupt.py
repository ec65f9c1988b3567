"""Ctrl-C and SIGTERM to `pipelines/train.py` mid-run, as an operator sends them: one line saying how to continue
(no Python traceback), the MLflow run KILLED (not FAILED), and the same command run again continues that run from
its checkpoint. Ctrl-C exits 130. After SIGTERM, Ray's core worker aborts the process as it shuts down (SIGABRT,
Ray 2.60), so that exit code is not checked. The command runs as a subprocess with its own local Ray, MLflow store
and run folder."""

from __future__ import annotations

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
from tests._train_helpers import REPO, SMOKE_CONFIG, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow

STEPS = 12
HINT = "run the same command again to continue from the latest checkpoint"


def _command(smoke_data, tmp_path: Path) -> list[str]:  # noqa: F811
    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={tmp_path}/runs", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"train.max_steps={STEPS}", "run.checkpoint_every_steps=2", "train.num_logged_images=0", "tracking.alias=",
    ]  # fmt: skip
    return [sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(SMOKE_CONFIG),
            *(a for o in overrides for a in ("--set", o))]  # fmt: skip


def _stop_at_step(command: list[str], sig: signal.Signals, log: Path, step: int) -> int:
    """Run `command` until it has logged `step`, send `sig`; its exit code."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {FAULTS_ENV: '{"step_delay_s": 0.5}'}
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not re.search(rf"step +{step}/{STEPS} ", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_ctrl_c_and_sigterm_stop_a_run_cleanly_and_the_command_continues_it(smoke_data, tmp_path):  # noqa: F811
    command, store = _command(smoke_data, tmp_path), MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for sig, at in ((signal.SIGINT, 4), (signal.SIGTERM, 8)):
        log = tmp_path / f"{sig.name}.log"
        code = _stop_at_step(command, sig, log, at)
        text = log.read_text()
        assert code == 130 or sig == signal.SIGTERM, text[-3000:]
        assert "Traceback" not in text and f"train: interrupted: {HINT}\n" in text, text[-3000:]
        assert [r.info.status for r in _runs(store)] == ["KILLED"], [(r.info.status, r.data.tags) for r in _runs(store)]
    # The same command once more, to the end: the same MLflow run, continued from checkpoints, never from step 0
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0 and "(resumed)" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = _runs(store)
    steps = [m.step for m in store.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert run.info.status == "FINISHED" and max(steps) == STEPS and steps.count(2) == 1, steps


def _runs(store: MlflowClient) -> list:
    return store.search_runs([e.experiment_id for e in store.search_experiments()])
