"""Runs that repeat: the smoke config (2 DDP workers on CPU, train.deterministic on by default) trained three
times in this process's Ray. Seed 0 clean; seed 0 again with a worker that raises at step 5 (the run resumes from
its step-4 checkpoint, mid-epoch: the data plan, the augmentation keys and the RNG states must all come back); and
seed 1. The first two must log the very same numbers at every step (loss, learning rate, gradient norm, val/AP);
the third must not, or the seed would not be what decides the run.
"""

from __future__ import annotations

import json

import pytest

from pipelines import names
from pipelines.training.faults import ENV as FAULTS_ENV
from tests._train_helpers import SMOKE_CONFIG, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow

STEPS = 8  # two epochs of the 16 smoke images at a global batch of 4; evaluated after each


def _train(name: str, seed: int, smoke_data, tmp_path, faults: dict | None = None) -> dict[str, list]:  # noqa: F811
    """One smoke run; {metric: [(step, value), ...]} as MLflow holds it."""
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.training.run import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(SMOKE_CONFIG, data_overrides(smoke_data) + [
        f"run.name={name}", f"run.storage_path={tmp_path}/runs", f"train.seed={seed}", f"train.max_steps={STEPS}",
        "train.log_every=1", "train.num_logged_images=0", "train.background_eval=false", "run.async_upload=false",
        "run.checkpoint_every_steps=4", f"tracking.tracking_uri={uri}", "tracking.experiment=retina-determinism",
        "tracking.alias=",
    ])  # fmt: skip
    mp = pytest.MonkeyPatch()
    if faults:
        mp.setenv(FAULTS_ENV, json.dumps(faults))
    try:
        run_id = run_training(cfg, str(SMOKE_CONFIG)).mlflow_run_id
    finally:
        mp.undo()
    client = MlflowClient(uri)
    keys = (names.TRAIN_LOSS, names.TRAIN_LR, names.TRAIN_GRAD_NORM, names.VAL_AP)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.fixture(scope="module")
def histories(ray_local, smoke_data, tmp_path_factory) -> dict[str, dict[str, list]]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("determinism")
    marker = tmp / "failed_once"
    return {
        "seed0": _train("seed0", 0, smoke_data, tmp),
        "seed0_resumed": _train(
            "seed0_resumed", 0, smoke_data, tmp, {"fail_at_step": 5, "fail_marker": str(marker)}
        ),  # fmt: skip
        "seed1": _train("seed1", 1, smoke_data, tmp),
        "failed_once": marker.exists(),
    }


def test_same_seed_same_run_through_a_worker_failure(histories):
    assert histories["failed_once"]  # the second run did lose a worker at step 5 and resume
    first, again = histories["seed0"], histories["seed0_resumed"]
    assert [s for s, _ in first[names.TRAIN_LOSS]] == list(range(1, STEPS + 1))
    assert len(first[names.VAL_AP]) == 2
    for key in first:
        assert again[key] == first[key], key  # exactly: not within a tolerance


def test_another_seed_another_run(histories):
    first, other = histories["seed0"], histories["seed1"]
    assert [v for _, v in other[names.TRAIN_LOSS]] != [v for _, v in first[names.TRAIN_LOSS]]
    differing = sum(a != b for (_, a), (_, b) in zip(first[names.TRAIN_LOSS], other[names.TRAIN_LOSS], strict=True))
    assert differing >= STEPS - 1  # not one stray step: the seed moves the whole history
