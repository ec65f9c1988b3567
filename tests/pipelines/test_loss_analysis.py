"""`evaluate.py --loss-analysis` without a model run: its flags, its MLflow metrics, artifacts and report (real
MLflow in an embedded SQLite store), and the worker loop's step-0 loss (train/initial_loss). Fast: no Ray.
The analysis of a trained model over shards: tests/pipelines/test_predict.py and tests/tuning/test_tuning_search.py."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from pipelines import evaluate, names
from pipelines.inference import loss_analysis
from pipelines.training import hooks
from pipelines.training.step import StepResult
from retina.analysis import LossConcentration
from retina.analysis.loss_concentration import DEFAULT_GAMMAS


def _result(positives: bool = True):
    """A result over hand-made logits: 2 × 3000 anchors, K = 3, a few foreground anchors when `positives`."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3000, 3, generator=g) * 2 - 4  # (B, A, K)
    targets = torch.full((2, 3000), -1)  # (B, A) background
    targets[:, :100] = -2  # ignored
    if positives:
        targets[:, 100:160] = torch.randint(0, 3, (2, 60), generator=g)
    acc = LossConcentration((0.0, 2.0))
    acc.update(logits, targets)
    return acc.result(num_points=11)


def test_metric_names_and_values():
    result = _result()
    metrics = loss_analysis.loss_analysis_metrics(result)
    assert names.loss_analysis_metric(2.0, "negative", 0.01) == "loss_analysis/gamma_2/neg_hardest_1pct"
    assert names.loss_analysis_metric(0.5, "positive", 0.2) == "loss_analysis/gamma_0.5/pos_hardest_20pct"
    assert metrics["loss_analysis/gamma_2/neg_hardest_5pct"] == result.gamma(2.0).negative.hardest_share[0.05]
    assert metrics["loss_analysis/gamma_0/pos_hardest_1pct"] == result.gamma(0.0).positive.hardest_share[0.01]
    assert metrics[names.LOSS_ANALYSIS_NUM_IGNORED] == 200 and metrics[names.LOSS_ANALYSIS_NUM_POSITIVES] == 120
    assert metrics[names.LOSS_ANALYSIS_NUM_NEGATIVES] == 2 * (3000 - 160)
    assert len(metrics) == 3 + 2 * 2 * 3  # counts + γ × kind × fraction
    # no foreground anchor: NaN shares are left out, not logged as NaN
    empty = loss_analysis.loss_analysis_metrics(_result(positives=False))
    assert not any("/pos_" in k for k in empty) and all(math.isfinite(v) for v in empty.values())


def test_logged_into_the_evaluation_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    result = _result()
    loss_analysis.log_loss_analysis(client, run_id, result)
    assert {a.path for a in client.list_artifacts(run_id, "loss_analysis")} == {
        names.LOSS_ANALYSIS_FIGURE_ARTIFACT, names.LOSS_ANALYSIS_TABLE_ARTIFACT, names.LOSS_ANALYSIS_RESULT_ARTIFACT
    }  # fmt: skip
    numbers = json.loads(
        (tmp_path / "artifacts" / run_id / "artifacts" / names.LOSS_ANALYSIS_RESULT_ARTIFACT).read_text()
    )
    assert [g["gamma"] for g in numbers["per_gamma"]] == [0.0, 2.0] and numbers["num_ignored"] == 200
    table = (tmp_path / "artifacts" / run_id / "artifacts" / names.LOSS_ANALYSIS_TABLE_ARTIFACT).read_text()
    assert table == loss_analysis.describe(result) and "negatives (N=5680)" in table
    logged = client.get_run(run_id).data.metrics
    assert logged == pytest.approx(loss_analysis.loss_analysis_metrics(result))
    # what the hardest anchors carry grows with γ (the paper's Figure 4), here on hand-made logits
    assert logged["loss_analysis/gamma_2/neg_hardest_5pct"] > logged["loss_analysis/gamma_0/neg_hardest_5pct"]


def test_cli_flags(capsys):
    args = evaluate.parse_args(["--model", "m", "--data", "d", "--loss-analysis", "--gammas", "0", "1.5"])
    assert args.loss_analysis and args.gammas == [0.0, 1.5]
    args = evaluate.parse_args(["--model", "m", "--data", "d", "--loss-analysis"])
    assert args.gammas is None  # the body fills in retina.analysis's defaults
    assert evaluate.DEFAULT_GAMMAS_HELP == " ".join(f"{g:g}" for g in DEFAULT_GAMMAS)  # --help says the truth
    assert not evaluate.parse_args(["--model", "m", "--data", "d"]).loss_analysis
    for bad, message in (
        (["--gammas", "2"], "--gammas needs --loss-analysis"),
        (["--loss-analysis", "--gammas", "2", "2"], "distinct"),
        (["--loss-analysis", "--gammas", "-1"], "distinct numbers >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.parse_args(["--model", "m", "--data", "d", *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


class _Tracker:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.events: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((dict(metrics), step))

    def log_events(self, metrics: dict, step: int) -> None:
        self.events.append((dict(metrics), step))


def test_first_step_logs_the_initial_loss_once_and_the_group_at_every_start():
    """One rank (no process group): the all-reduce is the identity, so the logged value is this batch's loss."""
    tracker = _Tracker()
    losses = {"loss_cls": torch.tensor(6.5), "loss_box": torch.tensor(0.5)}
    result = StepResult(losses, torch.tensor(7.0), None, torch.tensor(False))
    fresh = SimpleNamespace(
        step=1, world=1, global_batch=8, tracker=tracker, inputs=SimpleNamespace(run_started_at=0.0)
    )
    hooks.log_first_step(fresh, result, fresh=True)  # after the step: the loop has counted it
    [(metrics, step)] = tracker.logged
    assert step == 0 and metrics[names.TRAIN_INITIAL_LOSS] == 7.0 and metrics[names.STARTUP_FIRST_STEP_S] > 0
    assert tracker.events == [({names.TRAIN_WORLD_SIZE: 1, names.TRAIN_GLOBAL_BATCH: 8}, 0)]
    resumed = SimpleNamespace(**{**vars(fresh), "step": 251})  # a restart: the group again, at its step; no loss
    hooks.log_first_step(resumed, result, fresh=False)
    assert len(tracker.logged) == 1 and tracker.events[-1] == ({names.TRAIN_WORLD_SIZE: 1,
                                                                names.TRAIN_GLOBAL_BATCH: 8}, 250)  # fmt: skip
