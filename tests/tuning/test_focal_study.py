"""The focal-loss study presets (configs/focal_study.yaml: the paper's γ × α grid; configs/focal_prior_study.yaml:
its π ablation): what they load to and the trials their grid makes (fast, no Ray). The γ × α preset's real run
through tuning/search.py, with the loss analysis of the model it registers: tests/tuning/test_tuning_search.py."""

from __future__ import annotations

from pathlib import Path

from ray.tune.search.variant_generator import generate_variants

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
