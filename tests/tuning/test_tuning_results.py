"""Results table, CSV, plot, and the champion rule (alias moves only on improvement) against a real MLflow
registry in an embedded SQLite store. Fast: no Ray, no training."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import names
from tuning import results as res
from tuning.space import DIMENSIONS

DIMS = [d for d in DIMENSIONS if d.name != "lr"]
ERROR = "NonFiniteLossError: non-finite loss at step 0"
ROWS = [
    res.TrialRow("trial_000_aa", "aa", {"gamma": 2.0, "alpha": 0.25, "prior": 0.01}, 0.31, 4, "completed", "", ["c0"]),
    res.TrialRow("trial_001_bb", "bb", {"gamma": 4.5, "alpha": 0.8, "prior": 0.15}, 0.12, 1, "stopped", "", ["c1"]),
    res.TrialRow("trial_002_cc", "cc", {"gamma": 0.5, "alpha": 0.5, "prior": 0.002}, None, 0, "failed", ERROR, []),
]


def test_table_csv_and_plot(tmp_path):
    text = res.format_table(ROWS, DIMS)
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "gamma", "alpha", "prior", "val/AP", "(best)", "epochs", "status"]
    assert lines[2].split()[:7] == ["trial_000_aa", "2.0000", "0.2500", "0.0100", "0.3100", "4", "completed"]
    assert "stopped" in lines[3] and "failed (NonFiniteLossError" in lines[4]
    assert lines[4].split()[4] == "-"  # never evaluated

    path = res.write_csv(ROWS, DIMS, tmp_path / "results.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["completed", "stopped", "failed"]
    assert float(table[0]["best_val_AP"]) == 0.31 and table[2]["best_val_AP"] == ""
    assert float(table[1]["gamma"]) == 4.5

    fig = res.plot(ROWS, DIMS)
    axes = fig.get_axes()
    assert [a.get_xlabel() for a in axes] == ["gamma", "alpha", "prior"]
    assert axes[2].get_xscale() == "log"
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_best_row_ignores_failed_and_unevaluated_trials():
    assert res.best_row(ROWS).name == "trial_000_aa"
    assert res.best_row(ROWS[2:]) is None


@pytest.fixture
def registry(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("det")
    return client


def _version(client: MlflowClient, ap: float | None) -> str:
    """A new version of "det" tagged with its val/AP the way log_and_register tags it (no model logged)."""
    source = Path(client.tracking_uri[len("sqlite:///") :]).parent / "model"
    source.mkdir(exist_ok=True)
    mv = client.create_model_version("det", source=source.as_uri())
    if ap is not None:
        client.set_model_version_tag("det", mv.version, names.VERSION_VAL_AP_TAG, f"{ap:.4f}")
    return str(mv.version)


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias("det", "champion").version)


def test_champion_moves_only_on_improvement(registry):
    v1 = _version(registry, 0.30)
    first = res.promote_if_better(registry, "det", "champion", v1, 0.30)
    assert first.moved and first.previous_version is None and _champion(registry) == v1

    v2 = _version(registry, 0.25)  # worse: stays on v1
    worse = res.promote_if_better(registry, "det", "champion", v2, 0.25)
    assert not worse.moved and worse.previous_version == v1 and worse.previous_ap == 0.30
    assert _champion(registry) == v1
    assert worse.tags()[names.CHAMPION_TAG_PREFIX + "moved"] == "false"
    assert worse.tags()[names.CHAMPION_TAG_PREFIX + "previous_val_AP"] == "0.3000"

    v3 = _version(registry, 0.30)  # equal (at the tag's 4 decimals) is not better
    assert not res.promote_if_better(registry, "det", "champion", v3, 0.300004).moved
    assert _champion(registry) == v1

    v4 = _version(registry, 0.35)  # better: moves
    better = res.promote_if_better(registry, "det", "champion", v4, 0.35)
    assert better.moved and better.previous_version == v1 and _champion(registry) == v4
    assert "0.3500 > champion's 0.3000" in better.reason


def test_champion_respects_min_ap_and_untagged_champion(registry):
    v1 = _version(registry, 0.05)
    low = res.promote_if_better(registry, "det", "champion", v1, 0.05, min_ap=0.1)
    assert not low.moved and "alias_min_ap" in low.reason
    with pytest.raises(MlflowException):  # still no alias at all
        registry.get_model_version_by_alias("det", "champion")

    hand = _version(registry, None)  # a champion set by hand, without a val_AP to compare against
    registry.set_registered_model_alias("det", "champion", hand)
    v3 = _version(registry, 0.9)
    assert not res.promote_if_better(registry, "det", "champion", v3, 0.9).moved
    assert _champion(registry) == hand
