"""Evaluations scored in a background Ray task (train.background_eval, the default): training goes on while
COCOeval runs, and each evaluation still reaches MLflow and Ray with the val metrics of the step it evaluated and
the checkpoint of the weights it evaluated.

A 2-worker smoke run of 8 steps (4 per epoch): the step-4 evaluation is scored in the background, the step-8 one
(the last) in place. Checkpoints are local; MLflow is the embedded store of the run's folder.
"""

from __future__ import annotations

import pytest

from pipelines import names
from tests._train_helpers import SMOKE_CONFIG, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_local, smoke_data, tmp_path_factory):  # noqa: F811
    from pipelines.config import load_config
    from pipelines.training.run import run_training

    work = tmp_path_factory.mktemp("background-eval")
    cfg = load_config(SMOKE_CONFIG, data_overrides(smoke_data) + [
        "run.name=smoke_background", f"run.storage_path={work}/runs", "run.num_to_keep=2",
        f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", "train.max_steps=8", "train.lr_steps=[7]",
    ])  # fmt: skip
    assert cfg.train.background_eval  # the default
    return cfg, run_training(cfg)


def test_each_evaluation_is_logged_at_its_step_and_scored_off_the_training_path(run):
    from mlflow.tracking import MlflowClient

    cfg, outcome = run
    client = MlflowClient(cfg.tracking.tracking_uri)
    keys = (names.VAL_AP, names.VAL_SCORE_SECONDS, names.VAL_SECONDS, names.CHECKPOINT_SECONDS)
    history = {k: {m.step: m.value for m in client.get_metric_history(outcome.mlflow_run_id, k)} for k in keys}
    assert sorted(history[names.VAL_AP]) == [4, 8]
    assert sorted(history[names.VAL_SCORE_SECONDS]) == [4, 8]  # scored in the task at 4, in place at 8
    assert sorted(history[names.VAL_SECONDS]) == [4, 8]
    assert 4 in history[names.CHECKPOINT_SECONDS]
    artifacts = {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "evaluation")}
    assert "evaluation/report.json" in artifacts


def test_the_background_checkpoint_holds_the_evaluated_weights_and_their_score(run, tmp_path):
    """Ray kept the step-4 checkpoint with the val/AP the task computed; re-scoring its weights in place gives
    the same AP, so the checkpoint is the model that was evaluated (not the weights of a later step)."""
    import ray.train

    from pipelines.inference import load_model
    from pipelines.inference.evaluation import run_evaluation
    from pipelines.training.trainer import read_checkpoint

    cfg, outcome = run
    result = ray.train.Result.from_path(outcome.run_dir)
    by_step = {m[names.STEP]: (c, m) for c, m in result.best_checkpoints}
    assert 4 in by_step, sorted(by_step)
    checkpoint, reported = by_step[4]
    state = read_checkpoint(checkpoint)
    assert state.step == 4 and state.epoch == 1
    assert state.metrics[names.VAL_AP] == pytest.approx(reported[names.VAL_AP])
    assert reported[names.CHECKPOINT_SCORE] == reported[names.VAL_AP]
    again = run_evaluation(load_model(checkpoint.path), cfg.data.val_shards, batch_size=4)
    assert again.metrics["AP"] == pytest.approx(reported[names.VAL_AP], abs=1e-6)
