"""The focal-loss study presets (configs/focal_study.yaml: the paper's γ × α grid; configs/focal_prior_study.yaml:
its π ablation): what they load to and the trials their grid makes (fast, no Ray), and one real 2-trial run of
the γ × α preset through tuning/search.py, followed by the loss analysis of the model it registers (slow)."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.tune.search.variant_generator import generate_variants

from pipelines import names
from pipelines.config import load_config
from pipelines.data.plan import ShardIndex
from pipelines.training.faults import Faults
from pipelines.training.run import Prepared
from retina.typed_config import to_dict
from tuning import space
from tuning.config import load_search_config
from tuning.trial import TrialSetup, trial_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
STUDY = str(CONFIGS / "focal_study.yaml")
PRIOR_STUDY = str(CONFIGS / "focal_prior_study.yaml")
SHRUNK = ["tuning.gamma.values=[0, 2]", "tuning.alpha.values=[0.25]"]  # 2 of the 15 grid points


def _grid_params(cfg) -> list[dict[str, float]]:
    """The trials' parameters exactly as Tune's grid generator expands the param_space (no Ray needed)."""
    return [params for _, params in generate_variants(space.grid_space(cfg.tuning))]


def _assert_demo_scaling_per_trial(cfg, demo) -> None:
    """The demo's scaling, except the decode CPUs: one per trial, so that two trials fit side by side where the
    demo alone takes two."""
    scaling, demo_scaling = to_dict(cfg.scaling), to_dict(demo.scaling)
    assert (scaling.pop("data_cpus"), demo_scaling.pop("data_cpus")) == (1, 2)
    assert scaling == demo_scaling


def test_study_preset_is_the_demo_recipe_with_the_paper_grid():
    cfg, demo = load_search_config(STUDY), load_config(CONFIGS / "demo.yaml")
    for section in ("model", "data", "train"):
        assert to_dict(getattr(cfg, section)) == to_dict(getattr(demo, section)), section
    _assert_demo_scaling_per_trial(cfg, demo)
    t = cfg.tuning
    assert (t.search_alg, t.scheduler, t.prior.kind, t.lr.kind) == ("grid", "none", "fixed", "fixed")
    assert [d.name for d in space.searched(t)] == ["gamma", "alpha"] and space.grid_size(t) == 15
    params = _grid_params(cfg)
    assert sorted({p["gamma"] for p in params}) == [0.0, 0.5, 1.0, 2.0, 5.0]
    assert sorted({p["alpha"] for p in params}) == [0.25, 0.5, 0.75] and len(params) == 15


def test_prior_study_preset_searches_pi_with_cross_entropy():
    cfg, demo = load_search_config(PRIOR_STUDY), load_config(CONFIGS / "demo.yaml")
    for section in ("data", "train"):
        assert to_dict(getattr(cfg, section)) == to_dict(getattr(demo, section)), section
    _assert_demo_scaling_per_trial(cfg, demo)
    model, demo_model = to_dict(cfg.model), to_dict(demo.model)
    assert model.pop("loss") != demo_model.pop("loss") and model == demo_model  # only the loss differs
    assert (cfg.model.loss.gamma, cfg.model.loss.alpha) == (0.0, -1.0)  # the paper's standard CE
    assert [d.name for d in space.searched(cfg.tuning)] == ["prior"]
    assert [p["prior"] for p in _grid_params(cfg)] == [0.5, 0.1, 0.01]
    trial = space.apply_hyperparameters(cfg, {"prior": 0.5})
    assert (trial.model.head.prior, trial.model.loss.gamma, trial.model.loss.alpha) == (0.5, 0.0, -1.0)


def test_shrunk_study_grid_makes_two_trial_configs():
    cfg = load_search_config(STUDY, SHRUNK)
    params = _grid_params(cfg)
    assert params == [{"gamma": 0.0, "alpha": 0.25}, {"gamma": 2.0, "alpha": 0.25}]
    run = Prepared(cfg, [], ShardIndex(()), ShardIndex(()))
    setup = TrialSetup(run, "/runs/focal_study/trials", "sqlite:///x.db", "exp", "parent", Faults())
    trials = [trial_config(setup, p, f"trial_00{i}_ab") for i, p in enumerate(params)]
    assert [(t.model.loss.gamma, t.model.loss.alpha, t.model.head.prior) for t in trials] == [
        (0.0, 0.25, 0.01),
        (2.0, 0.25, 0.01),
    ]
    assert [t.run.name for t in trials] == ["trial_000_ab", "trial_001_ab"]
    assert all(to_dict(t.train) == to_dict(cfg.train) for t in trials)  # the recipe itself is untouched


# ------------------------------------------------------------------------------------------------ slow


def _smoke_overrides(tmp_path: Path) -> list[str]:
    """The preset on 16 + 8 synthetic images, one worker per trial, 2 steps (one epoch, one evaluation)."""
    data = tmp_path / "data"
    return [
        f"data.root={data}",
        f"data.train_shards={data / 'shards' / 'train'}",
        f"data.val_shards={data / 'shards' / 'val'}",
        "data.synthetic_images=16",
        "data.synthetic_val_images=8",
        "data.batch_size=8",
        "data.val_batch_size=8",
        # One DDP worker per trial keeps the test within its time budget on 2 cores (as test_tuning_search.py)
        "scaling.num_workers=1",
        "train.max_steps=2",
        "train.num_logged_images=0",
        f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=retina-focal-study-test",
        "tracking.registered_model_name=retinanet-focal-study-test",
        "tuning.name=focal_study_test",
        *SHRUNK,
    ]


def _run(cmd: list[str], tmp_path: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


# The console's line for a trial that ran to its end (tuning/console.py): its γ, α, π, best val/AP and AP50.
TRIAL_LINE = re.compile(
    r"^\d\d:\d\d:\d\d (trial_00\d_\w+)  completed +gamma=(\S+) alpha=(\S+) prior=(\S+)  "
    r"val/AP (\d\.\d{4})  AP50 \d\.\d{4}",
    re.M,
)


def _check_console(stdout: str, stderr: str) -> None:
    """What the command shows without --verbose: one line per trial as it ends, the final table best val/AP
    first, the best trial and the MLflow parent run; none of Ray Tune's own status tables or result dicts."""
    lines = TRIAL_LINE.findall(stderr)
    assert sorted((name[:9], gamma, alpha) for name, gamma, alpha, _, _ in lines) == [
        ("trial_000", "0", "0.25"), ("trial_001", "2", "0.25")
    ], stderr[-3000:]  # fmt: skip
    assert all(float(prior) > 0 for *_, prior, _ in lines)
    header = next(i for i, line in enumerate(stdout.splitlines()) if line.split()[:2] == ["trial", "gamma"])
    table = stdout.splitlines()[header + 2 : header + 4]
    aps = [float(line.split()[3]) for line in table]
    assert aps == sorted(aps, reverse=True) and {line.split()[0] for line in table} == {n for n, *_ in lines}
    assert {float(ap) for *_, ap in lines} == set(aps)  # the lines and the table agree
    assert "best trial:" in stdout and "MLflow parent run:" in stdout and "MLflow UI:" in stdout
    for tune_output in ("Trial status", "== Status ==", "Configuration for experiment", "Trial trial_00"):
        assert tune_output not in stdout + stderr, tune_output


@pytest.mark.slow
def test_study_preset_runs_two_trials_and_its_model_gets_a_loss_analysis(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    overrides = [a for o in _smoke_overrides(tmp_path) for a in ("--set", o)]
    proc = _run([sys.executable, str(REPO / "tuning" / "search.py"), "--config", STUDY, *overrides], tmp_path, env,
                timeout=900)  # fmt: skip
    assert "gamma \\ alpha" in proc.stdout and "alpha=0.25" in proc.stdout, proc.stdout[-3000:]
    _check_console(proc.stdout, proc.stderr)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("retina-focal-study-test").experiment_id],
        "attributes.run_name = 'focal_study_test'",
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert {"search/paper_table.txt", "search/paper_table.csv", "search/val_AP_heatmap.png"} <= artifacts
    text = client.download_artifacts(parent.info.run_id, "search/paper_table.csv", str(tmp_path))
    table = list(csv.DictReader(io.StringIO(Path(text).read_text())))
    assert [float(r["gamma"]) for r in table] == [0.0, 2.0]
    assert all(r["alpha=0.25 status"] == "completed" and float(r["alpha=0.25 AP"]) >= 0 for r in table)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{names.MLFLOW_PARENT_TAG}` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:  # the step-0 loss of each trial, before any update
        assert child.data.metrics[names.TRAIN_INITIAL_LOSS] > 0
    assert [h.step for h in client.get_metric_history(children[0].info.run_id, names.TRAIN_INITIAL_LOSS)] == [0]
    search_seconds = time.monotonic() - started

    # the study's registered model through `evaluate.py --loss-analysis`, logged into its evaluation run
    model_uri = client.get_run(parent.info.run_id).data.tags[names.MODEL_URI_TAG]
    proc = _run([sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model", model_uri,
                 "--data", str(tmp_path / "data" / "shards" / "val"), "--loss-analysis", "--gammas", "0", "2"],
                tmp_path, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                timeout=300)  # fmt: skip
    assert "Loss concentration" in proc.stdout and "negatives (N=" in proc.stdout, proc.stdout[-3000:]
    [evaluation] = client.search_runs([parent.info.experiment_id], "tags.`retina.task` = 'evaluation'")
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id, "loss_analysis")}
    assert logged == {"loss_analysis/loss_concentration.png", "loss_analysis/table.txt", "loss_analysis/result.json"}
    metrics = evaluation.data.metrics
    assert (
        metrics[names.loss_analysis_metric(2.0, "negative", 0.05)]
        > metrics[names.loss_analysis_metric(0.0, "negative", 0.05)]
    )
    print(f"search {search_seconds:.0f} s, with the loss analysis {time.monotonic() - started:.0f} s")
