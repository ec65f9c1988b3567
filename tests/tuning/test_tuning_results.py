"""Results table, CSV, plot, and the alias rule (pipelines/tracking/alias.py: it moves only on improvement)
against a real MLflow registry in an embedded SQLite store. Fast: no Ray, no training."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import names
from pipelines.tracking.alias import promote_if_better
from tuning import configurations as cf
from tuning import paper as pp
from tuning import results as res
from tuning.space import DIMENSIONS

DIMS = [d for d in DIMENSIONS if d.name != "lr"]
ERROR = "NonFiniteLossError: non-finite loss at step 0"
ROWS = [
    res.TrialRow("trial_000_aa", "aa", {"gamma": 2.0, "alpha": 0.25, "prior": 0.01}, 0.31, 4, "completed", "", ["c0"]),
    res.TrialRow("trial_001_bb", "bb", {"gamma": 4.5, "alpha": 0.8, "prior": 0.15}, 0.12, 1, "stopped", "", ["c1"]),
    res.TrialRow("trial_002_cc", "cc", {"gamma": 0.5, "alpha": 0.5, "prior": 0.002}, None, 0, "diverged", ERROR, []),
]


def test_table_csv_and_plot(tmp_path):
    text = res.format_table(ROWS, DIMS)
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "gamma", "alpha", "prior", "val/AP", "AP50", "epochs", "status"]
    assert lines[2].split() == ["trial_000_aa", "2.0000", "0.2500", "0.0100", "0.3100", "-", "4", "completed"]
    assert lines[3].endswith("stopped early (ASHA)") and lines[4].endswith("  diverged")
    assert lines[4].split()[4:6] == ["-", "-"]  # never evaluated

    path = res.write_csv(ROWS, DIMS, tmp_path / "results.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["completed", "stopped", "diverged"]
    assert float(table[0]["best_val_AP"]) == 0.31 and table[2]["best_val_AP"] == ""
    assert float(table[1]["gamma"]) == 4.5

    fig = res.plot(ROWS, DIMS)
    axes = fig.get_axes()
    assert [a.get_xlabel() for a in axes] == ["gamma", "alpha", "prior"]
    assert axes[2].get_xscale() == "log"
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_end_states_counts_and_order_by_ap():
    crashed = res.TrialRow("trial_003_dd", "dd", {"gamma": 1.0}, None, 0, "failed", "RayActorError: node died", [])
    lost = res.TrialRow("trial_004_ee", "ee", {}, None, 0, "failed", "The actor died unexpectedly before it ran.", [])
    rows = [*ROWS, crashed, lost]
    assert [res.end_state(r) for r in rows] == [
        "completed", "stopped early (ASHA)", "diverged", "failed (RayActorError)",
        "failed (The actor died unexpectedly before it...)",  # no class named: shortened
    ]  # fmt: skip
    assert res.state_counts([*ROWS, ROWS[0]]) == "2 completed, 1 stopped early (ASHA), 1 diverged"
    evaluated_late = res.TrialRow("trial_005_ff", "ff", {}, 0.5, 1, "stopped", "", [])
    assert [r.trial_id for r in res.by_ap([*rows, evaluated_late])] == ["ff", "aa", "bb", "cc", "dd", "ee"]
    assert res.error_line("Failure # 1\nTraceback ...\npipelines.training.run.NonFiniteLossError: loss=nan") == (
        "NonFiniteLossError: loss=nan"
    )


def test_champion_ignores_failed_and_unevaluated_trials():
    assert cf.champion(cf.group(ROWS)).best.name == "trial_000_aa"  # one seed: the best trial
    assert cf.champion(cf.group(ROWS[2:])) is None


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
    first = promote_if_better(registry, "det", "champion", v1, 0.30)
    assert first.moved and first.previous_version is None and _champion(registry) == v1

    v2 = _version(registry, 0.25)  # worse: stays on v1
    worse = promote_if_better(registry, "det", "champion", v2, 0.25)
    assert not worse.moved and worse.previous_version == v1 and worse.previous_ap == 0.30
    assert _champion(registry) == v1
    assert worse.tags()[names.CHAMPION_TAG_PREFIX + "moved"] == "false"
    assert worse.tags()[names.CHAMPION_TAG_PREFIX + "previous_val_AP"] == "0.3000"

    v3 = _version(registry, 0.30)  # equal (at the tag's 4 decimals) is not better
    assert not promote_if_better(registry, "det", "champion", v3, 0.300004).moved
    assert _champion(registry) == v1

    v4 = _version(registry, 0.35)  # better: moves
    better = promote_if_better(registry, "det", "champion", v4, 0.35)
    assert better.moved and better.previous_version == v1 and _champion(registry) == v4
    assert "0.3500 > champion's 0.3000" in better.reason


def test_the_minimum_is_checked_on_the_exact_ap_not_the_tag_s_four_decimals(registry):
    v1 = _version(registry, 3e-5)  # its tag reads 0.0000
    assert promote_if_better(registry, "det", "champion", v1, 3e-5, min_ap=1e-6).moved and _champion(registry) == v1


def test_champion_respects_min_ap_and_untagged_champion(registry):
    v1 = _version(registry, 0.05)
    low = promote_if_better(registry, "det", "champion", v1, 0.05, min_ap=0.1)
    assert not low.moved and "alias_min_ap" in low.reason
    with pytest.raises(MlflowException):  # still no alias at all
        registry.get_model_version_by_alias("det", "champion")

    hand = _version(registry, None)  # a champion set by hand, without a val_AP to compare against
    registry.set_registered_model_alias("det", "champion", hand)
    v3 = _version(registry, 0.9)
    assert not promote_if_better(registry, "det", "champion", v3, 0.9).moved
    assert _champion(registry) == hand


# ------------------------------------------------------------------------------------------------ the paper's layout

GAMMA_ALPHA = [d for d in DIMENSIONS if d.name in ("gamma", "alpha")]
PRIOR = [d for d in DIMENSIONS if d.name == "prior"]
DIVERGED = "NonFiniteLossError: non-finite loss at step 0: rank 0: loss=nan loss_cls=nan loss_box=0.52"
STUDY_ROWS = [  # a γ × α grid: four evaluated cells, one diverged, one crashed, one stopped before its evaluation
    res.TrialRow("trial_000_a", "a", {"gamma": 0.0, "alpha": 0.25}, 0.108, 2, "completed", "", ["c"], 0.2, 0.1, 5.2),
    res.TrialRow("trial_001_b", "b", {"gamma": 0.0, "alpha": 0.75}, 0.311, 2, "completed", "", ["c"], 0.49, 0.33, 4.0),
    res.TrialRow("trial_002_c", "c", {"gamma": 2.0, "alpha": 0.25}, 0.34, 2, "completed", "", ["c"], 0.525, 0.365, 1.1),
    res.TrialRow(
        "trial_003_d", "d", {"gamma": 2.0, "alpha": 0.75}, None, 0, "diverged", DIVERGED, [], initial_loss=0.9
    ),
    res.TrialRow("trial_004_e", "e", {"gamma": 5.0, "alpha": 0.25}, None, 0, "failed", "RuntimeError: lost node", []),
    res.TrialRow("trial_005_f", "f", {"gamma": 5.0, "alpha": 0.75}, None, 0, "stopped", "", []),
    res.TrialRow("trial_006_g", "g", {"gamma": 0.5, "alpha": 0.25}, 0.2, 1, "completed", "", ["c"]),  # no AP50/75
]


def test_diverged_is_its_own_status_and_a_failure():
    assert [r.diverged for r in STUDY_ROWS] == [False, False, False, True, False, False, False]
    assert [r.failed for r in STUDY_ROWS] == [False, False, False, True, True, False, False]
    assert ROWS[2].diverged and not ROWS[0].diverged


def test_paper_table_rows_gamma_columns_alpha_with_failed_and_diverged_cells():
    assert pp.paper_layout(GAMMA_ALPHA) == tuple(GAMMA_ALPHA) and pp.paper_layout(DIMS) is None
    lines = pp.format_paper_table(STUDY_ROWS, GAMMA_ALPHA).splitlines()
    grid = [[c.strip() for c in line.split("|")] for line in lines[2:8] if "|" in line]
    assert grid == [
        ["gamma \\ alpha", "alpha=0.25", "alpha=0.75"],
        ["0", "10.8 / 20.0 / 10.0", "31.1 / 49.0 / 33.0"],
        ["0.5", "20.0 / - / -", ""],  # a cell the grid never ran stays empty
        ["2", "34.0 / 52.5 / 36.5", "diverged"],
        ["5", "failed", "stopped"],
    ]
    trials = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines[9:]}
    assert trials["trial_003_d"] == ["2", "0.75", "0.9000", "yes", "diverged (" + DIVERGED + ")"]
    assert trials["trial_004_e"][2:] == ["-", "no", "failed (RuntimeError: lost node)"]
    assert trials["trial_000_a"][2:4] == ["5.2000", "no"]


def test_paper_csv_has_numbers_and_the_status_of_every_cell(tmp_path):
    path = pp.write_paper_csv(STUDY_ROWS, GAMMA_ALPHA, tmp_path / "paper.csv")
    with path.open() as f:
        table = {r["gamma"]: r for r in csv.DictReader(f)}
    assert list(table) == ["0.0", "0.5", "2.0", "5.0"]
    assert float(table["2.0"]["alpha=0.25 AP"]) == 0.34 and float(table["2.0"]["alpha=0.25 AP75"]) == 0.365
    assert table["2.0"]["alpha=0.75 status"] == "diverged" and table["2.0"]["alpha=0.75 AP"] == ""
    assert table["5.0"]["alpha=0.25 status"] == "failed" and table["0.5"]["alpha=0.75 status"] == ""
    # the per-trial CSV gains AP50/AP75, the initial loss and the diverged flag (after the original columns)
    with res.write_csv(STUDY_ROWS, GAMMA_ALPHA, tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["diverged"] for r in rows[2:5]] == ["False", "True", "False"]
    assert float(rows[0]["initial_loss"]) == 5.2 and rows[4]["initial_loss"] == "" and rows[6]["val_AP50"] == ""


def test_heatmap_colours_evaluated_cells_and_labels_the_others(tmp_path):
    fig = pp.heatmap(STUDY_ROWS, GAMMA_ALPHA)
    ax = fig.get_axes()[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("gamma", "alpha")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "0.5", "2", "5"]
    values = ax.get_images()[0].get_array()  # (γ, α) AP in %, masked where a trial has no AP
    assert values[2, 0] == pytest.approx(34.0) and values.mask.tolist() == [
        [False, False], [False, True], [False, True], [True, True]
    ]  # fmt: skip
    assert {"diverged", "failed", "stopped", "34.0"} <= {t.get_text() for t in ax.texts}
    fig.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


def test_prior_study_has_one_row_per_pi():
    rows = [
        res.TrialRow("trial_000_a", "a", {"prior": 0.5}, None, 0, "diverged", DIVERGED, [], initial_loss=60.0),
        res.TrialRow("trial_001_b", "b", {"prior": 0.1}, 0.2, 2, "completed", "", ["c"], 0.3, 0.2, 5.0),
        res.TrialRow("trial_002_c", "c", {"prior": 0.01}, 0.25, 2, "completed", "", ["c"], 0.4, 0.25, 1.2),
    ]
    lines = pp.format_paper_table(rows, PRIOR).splitlines()
    assert [c.strip() for c in lines[2].split("|")] == ["prior", "AP / AP50 / AP75"]
    assert [[c.strip() for c in line.split("|")] for line in lines[4:7]] == [
        ["0.01", "25.0 / 40.0 / 25.0"], ["0.1", "20.0 / 30.0 / 20.0"], ["0.5", "diverged"]
    ]  # fmt: skip
    assert "60.0000" in lines[-3] and "yes" in lines[-3]
    ax = pp.heatmap(rows, PRIOR).get_axes()[0]
    assert ax.get_ylabel() == "prior" and ax.get_images()[0].get_array().shape == (3, 1)


def test_initial_losses_and_divergence_come_from_the_trials_child_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("search", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id
    for trial_id, loss in (("aa", 3.5), ("bb", None)):  # bb diverged before logging one
        child = client.create_run(exp, tags={names.MLFLOW_PARENT_TAG: parent, names.TRIAL_ID_TAG: trial_id,
                                             names.TRIAL_STATUS_TAG: "completed" if loss else "diverged"})  # fmt: skip
        if loss is not None:
            client.log_metric(child.info.run_id, names.TRAIN_INITIAL_LOSS, loss, step=0)
    other = client.create_run(exp, tags={names.TRIAL_ID_TAG: "cc"})  # another search's trial: not read
    client.log_metric(other.info.run_id, names.TRAIN_INITIAL_LOSS, 9.0, step=0)
    # as Tune reports them: every error a failure (the error text is no evidence either way)
    tune_rows = [ROWS[0], dataclasses.replace(ROWS[1], status="failed", error="RayTaskError: ..."),
                 dataclasses.replace(ROWS[2], status="failed")]  # fmt: skip
    rows = res.with_run_facts(tune_rows, client, parent)
    assert [r.initial_loss for r in rows] == [3.5, None, None]
    assert [r.status for r in rows] == ["completed", "diverged", "failed"]  # cc: no run of this search says so
    assert [r.name for r in rows] == [r.name for r in ROWS] and ROWS[0].initial_loss is None  # a new list


def test_best_evaluation_gives_ap50_and_ap75_of_the_same_epoch():
    import pandas as pd

    df = pd.DataFrame({names.VAL_AP: [0.1, 0.3, 0.2], names.VAL_AP50: [0.2, 0.5, 0.6],
                       names.VAL_AP75: [0.05, 0.35, 0.1], "epoch": [1, 2, 3]})  # fmt: skip
    found = res._evaluations(df)
    assert (found["best_ap"], found["ap50"], found["ap75"], found["epochs"]) == (0.3, 0.5, 0.35, 3)
    assert res._evaluations(pd.DataFrame({"epoch": [1]})) == {}  # never evaluated
