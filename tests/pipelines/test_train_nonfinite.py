"""A non-finite loss stops the run with a clear error (step + every rank's loss terms), on all ranks together,
without a checkpoint holding NaN weights, and the MLflow run ends FAILED. Then the same command, re-run after
the cause is gone, resumes that run from its last good checkpoint instead of starting over.

The step-4 evaluation is scored in a background Ray task (train.background_eval, the default) and the NaN comes at
step 5: that evaluation and its checkpoint must still be reported (the good state the re-run resumes from), with
the score of the weights it evaluated.

MLflow here is the embedded default: no tracking URI anywhere → ``sqlite:///mlflow.db`` in the working directory.
The NaN comes from ``RETINA_TEST_FAULTS={"nan_at_step": 5}`` in this process, the run's driver.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import names
from pipelines.training.faults import ENV as FAULTS_ENV
from tests._train_helpers import SMOKE_CONFIG, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow

RUN_NAME = "smoke_nan"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("nan-run")


def _config(smoke_data, workdir, *extra):  # noqa: F811
    from pipelines.config import load_config

    return load_config(
        SMOKE_CONFIG,
        data_overrides(smoke_data) + [f"run.name={RUN_NAME}", f"run.storage_path={workdir}/runs", *extra],
    )


@pytest.fixture(scope="module")
def nan_run(ray_local, smoke_data, workdir):  # noqa: F811
    from pipelines.training.run import NonFiniteLossError, run_training

    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv(FAULTS_ENV, json.dumps({"nan_at_step": 5}))
    try:
        with pytest.raises(NonFiniteLossError) as info:
            run_training(_config(smoke_data, workdir))
    finally:
        mp.undo()
    return info.value


def _runs(workdir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("retina-smoke")
    return client, client.search_runs([exp.experiment_id])


def test_error_names_step_and_loss_terms_of_every_rank(nan_run):
    message = str(nan_run)
    assert "non-finite loss at step 5" in message
    for part in ("rank 0: loss=nan", "rank 1: loss=nan", "loss_cls=nan", "loss_box=", "grad_norm=nan"):
        assert part in message, (part, message)


def test_mlflow_run_failed_in_embedded_store(nan_run, workdir):
    assert (workdir / "mlflow.db").exists()  # the default store, in the working directory
    _, runs = _runs(workdir)
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert "non-finite loss at step 5" in runs[0].data.tags[names.ERROR_TAG]


def test_no_checkpoint_with_nan_weights(nan_run, workdir):
    from pipelines.training.checkpoint import STATE_FILE, load_checkpoint

    states = sorted((workdir / "runs" / RUN_NAME).glob(f"checkpoint_*/{STATE_FILE}"))
    assert len(states) == 1  # the step-4 checkpoint; nothing was written after the NaN
    state = load_checkpoint(states[0].parent)
    assert state.step == 4
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


def test_background_evaluation_reported_with_the_weights_it_scored(nan_run, workdir, smoke_data):  # noqa: F811
    """The step-4 evaluation ran in the background: its val metrics are logged at step 4 with the scoring time, its
    checkpoint records that val/AP, and re-scoring the checkpoint's weights in place gives the same AP (so the
    checkpoint holds the evaluated weights, not a later step's)."""
    from pipelines.inference import load_model
    from pipelines.inference.evaluation import run_evaluation
    from pipelines.training.checkpoint import METRICS_FILE, STATE_FILE, load_checkpoint

    client, runs = _runs(workdir)
    run_id = runs[0].info.run_id  # the failed run (before the re-run below continues it)
    ap = {m.step: m.value for m in client.get_metric_history(run_id, names.VAL_AP)}
    assert 4 in ap
    assert 4 in {m.step for m in client.get_metric_history(run_id, names.VAL_SCORE_SECONDS)}
    directory = sorted((workdir / "runs" / RUN_NAME).glob(f"checkpoint_*/{STATE_FILE}"))[0].parent
    assert (directory / METRICS_FILE).exists()
    state = load_checkpoint(directory)
    assert state.step == 4 and state.metrics[names.VAL_AP] == pytest.approx(ap[4])
    again = run_evaluation(load_model(str(directory)), smoke_data["val_shards"], batch_size=4)
    assert again.metrics["AP"] == pytest.approx(ap[4], abs=1e-6)


def test_rerun_resumes_the_same_run_from_its_checkpoint(nan_run, smoke_data, workdir):  # noqa: F811
    from pipelines.training.run import run_training

    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv(FAULTS_ENV, raising=False)  # the cause is gone
    try:
        outcome = run_training(_config(smoke_data, workdir))
    finally:
        mp.undo()
    assert outcome.resumed
    assert outcome.metrics[names.STEP] == 6
    client, runs = _runs(workdir)
    assert [r.info.run_id for r in runs] == [outcome.mlflow_run_id]  # no second MLflow run
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[names.RESUMED_FROM_TAG] == "4"
    assert [m.step for m in client.get_metric_history(outcome.mlflow_run_id, names.VAL_AP)] == [4, 6]
