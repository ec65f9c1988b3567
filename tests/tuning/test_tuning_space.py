"""The search space from the config: validation (clear errors naming the key), seeded searchers, trial configs,
concurrency and ASHA set-up. Fast: no Ray cluster, no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data.plan import ShardIndex
from pipelines.training.faults import Faults
from pipelines.training.run import Prepared
from retina.typed_config import ConfigError
from tuning import experiment, space
from tuning.config import SearchConfig, load_search_config, validate_tuning
from tuning.trial import TrialNamer, TrialSetup, trial_config, trial_number

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml")


def cfg_with(*overrides: str) -> SearchConfig:
    return load_search_config(SMOKE, list(overrides))


def test_default_space_is_the_issue_s():
    t = cfg_with().tuning
    validate_tuning(t)
    assert [d.name for d in space.searched(t)] == ["gamma", "alpha", "prior"]  # lr is fixed unless asked for
    assert (t.gamma.kind, t.gamma.low, t.gamma.high) == ("uniform", 0.0, 5.0)
    assert (t.alpha.kind, t.alpha.low, t.alpha.high) == ("uniform", 0.1, 0.9)
    assert (t.prior.kind, t.prior.low, t.prior.high) == ("loguniform", 1e-3, 0.2)
    # a partial override keeps that dimension's own defaults
    t2 = cfg_with("tuning.gamma.high=3", "tuning.lr.kind=loguniform").tuning
    assert (t2.gamma.low, t2.gamma.high) == (0.0, 3.0)
    assert [d.name for d in space.searched(t2)] == ["gamma", "alpha", "prior", "lr"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["tuning.prior.high=1.5"], "tuning.prior.high"),
        (["tuning.prior.kind=uniform", "tuning.prior.low=0"], "tuning.prior.low"),
        (["tuning.prior.kind=choice", "tuning.prior.values=[0.01, 1.0]"], "tuning.prior.values[1]"),
        (["tuning.gamma.low=-1"], "tuning.gamma.low"),
        (["tuning.gamma.low=4", "tuning.gamma.high=2"], "tuning.gamma"),
        (["tuning.alpha.high=1.2"], "tuning.alpha.high"),
        (["tuning.alpha.low=-0.5"], "tuning.alpha.low"),  # only a choice may disable α (< 0)
        (["tuning.alpha.kind=choice"], "tuning.alpha.values"),
        (["tuning.gamma.kind=normal"], "tuning.gamma.kind"),
        (["tuning.lr.kind=loguniform", "tuning.lr.low=0"], "tuning.lr.low"),
        (["tuning.search_alg=bayes"], "tuning.search_alg"),
        (["tuning.scheduler=pbt"], "tuning.scheduler"),
        (["tuning.num_samples=0"], "tuning.num_samples"),
        (["tuning.gamma.kind=fixed", "tuning.alpha.kind=fixed", "tuning.prior.kind=fixed"], "tuning"),
    ],
)
def test_invalid_spaces_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)  # the space is checked when the config loads
    assert str(err.value).startswith(f"{SMOKE}: {key}:"), str(err.value)


def test_unknown_tuning_key_is_a_config_error():
    with pytest.raises(ConfigError, match="tuning.gamma.hi"):
        cfg_with("tuning.gamma.hi=3")


def test_alpha_choice_may_disable_alpha_weighting():
    cfg = cfg_with("tuning.alpha.kind=choice", "tuning.alpha.values=[-1, 0.25, 0.5]")
    trial = space.apply_hyperparameters(cfg, {"alpha": -1.0, "gamma": 0.0, "prior": 0.05})
    assert trial.model.loss.alpha == -1.0 and trial.model.loss.gamma == 0.0 and trial.model.head.prior == 0.05


def test_cli_rejects_an_invalid_space_before_ray_starts(capsys, monkeypatch):
    import cluster.connect
    from pipelines.cli import EXIT_BAD_INPUT
    from pipelines.training import run as training_run
    from tuning import search

    # Other tests may already have a Ray session in this process, so watch for the connection attempt itself.
    connects = []
    monkeypatch.setattr(cluster.connect, "connect_ray", lambda **kw: connects.append(kw))
    monkeypatch.setattr(training_run, "connect_ray", lambda **kw: connects.append(kw))
    assert search.main(["--config", SMOKE, "--set", "tuning.prior.high=1.5"]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()  # (log lines of earlier tests' threads may come first)
    assert any(line.startswith("search: error: ") and "tuning.prior.high" in line for line in lines), lines
    assert connects == []


def test_a_local_ray_is_sized_for_a_whole_trial(monkeypatch):
    """Its workers, its data CPUs and its own driver process: sized without the driver's 0.25 CPU, the demo recipe's
    trial (3.25 CPUs) never got placed on the 3 CPUs a 2-core machine's local Ray had, and the search waited."""
    from pipelines.training import run as training_run
    from tuning.experiment import run_search

    class Connected(Exception):
        pass

    def connect_ray(**kw):
        raise Connected(kw["cpus_needed"])

    monkeypatch.setattr(training_run, "connect_ray", connect_ray)
    cfg = cfg_with("scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.data_cpus=1")
    with pytest.raises(Connected) as connected:
        run_search(cfg)
    assert connected.value.args[0] == 2 * 1 + 1 + cfg.tuning.driver_cpus > 3


def test_command_line_flags_override_the_tuning_section():
    from tuning import search

    args = search.parse_args(["--config", SMOKE, "--set", "tuning.num_samples=5", "--num-samples", "2",
                              "--scheduler", "none"])  # fmt: skip
    cfg = cfg_with(*search.overrides_from_args(args))
    assert cfg.tuning.num_samples == 2 and cfg.tuning.scheduler == "none"  # the flags win over --set


def test_apply_hyperparameters_sets_the_training_keys():
    cfg = cfg_with("tuning.lr.kind=loguniform")
    trial = space.apply_hyperparameters(cfg, {"gamma": 1.5, "alpha": 0.3, "prior": 0.02, "lr": 0.005})
    assert (trial.model.loss.gamma, trial.model.loss.alpha, trial.model.head.prior) == (1.5, 0.3, 0.02)
    assert trial.train.base_lr == 0.005
    assert cfg.model.loss.gamma == 2.0  # the base config is untouched
    assert type(trial) is type(cfg) and trial.tuning == cfg.tuning  # a deep copy of the same kind of config
    trial.model.anchors.sizes.append(1024.0)
    assert len(cfg.model.anchors.sizes) == 5  # nothing shared with the base
    with pytest.raises(ConfigError, match="model.head.prior"):
        space.apply_hyperparameters(cfg, {"prior": 1.0})


def test_trial_config_is_the_trial_s_own_train_run():
    cfg = cfg_with()
    run = Prepared(cfg, [], ShardIndex(()), ShardIndex(()))
    setup = TrialSetup(run, "/runs/search/trials", "sqlite:///x.db", "exp", "parent", Faults())
    trial = trial_config(setup, {"gamma": 1.0, "alpha": 0.5, "prior": 0.1}, "trial_001_ab12")
    assert (trial.run.name, trial.run.storage_path) == ("trial_001_ab12", "/runs/search/trials")
    assert (trial.model.loss.gamma, trial.model.loss.alpha, trial.model.head.prior) == (1.0, 0.5, 0.1)
    assert cfg.run.name == "smoke" and cfg.model.loss.gamma == 2.0


def _suggestions(cfg, n: int) -> list[dict]:
    """Ask the searcher for n trials one after another, telling it a deterministic score for each."""
    searcher = space.build_searcher(cfg.tuning)
    out = []
    for i in range(n):
        params = searcher.suggest(f"t{i}")
        out.append(params)
        score = -((params["gamma"] - 2.0) ** 2) - (params["alpha"] - 0.25) ** 2  # best near the paper's values
        searcher.on_trial_complete(f"t{i}", {space.METRIC: score, "training_iteration": 1})
    return out


@pytest.mark.parametrize("alg", ["tpe", "random"])
def test_seeded_suggestions_are_reproducible(alg):
    # 8 trials with 3 random start-up trials: TPE's model-based suggestions are covered too
    cfg = cfg_with(f"tuning.search_alg={alg}", "tuning.tpe_startup_trials=3", "tuning.seed=7")
    first, second = _suggestions(cfg, 8), _suggestions(cfg, 8)
    assert first == second
    other = _suggestions(cfg_with(f"tuning.search_alg={alg}", "tuning.tpe_startup_trials=3", "tuning.seed=8"), 8)
    assert other != first
    for p in first:  # inside the configured space
        assert 0 <= p["gamma"] <= 5 and 0.1 <= p["alpha"] <= 0.9 and 1e-3 <= p["prior"] <= 0.2


def test_grid_points():
    cfg = cfg_with("tuning.search_alg=grid", "tuning.grid_points=3", "tuning.alpha.kind=fixed")
    assert space.grid_points(cfg.tuning.gamma, 3) == [0.0, 2.5, 5.0]
    assert space.grid_points(cfg.tuning.prior, 3) == pytest.approx([1e-3, (1e-3 * 0.2) ** 0.5, 0.2])
    assert space.grid_size(cfg.tuning) == 9
    assert space.build_searcher(cfg.tuning) is None
    assert set(space.grid_space(cfg.tuning)) == {"gamma", "prior"}
    # explicit values are the grid's points
    cfg = cfg_with("tuning.search_alg=grid", "tuning.gamma.values=[0, 2]", "tuning.alpha.kind=fixed",
                   "tuning.prior.kind=fixed")  # fmt: skip
    assert space.grid_size(cfg.tuning) == 2


def test_trial_names_carry_the_creation_number():
    class FakeTrial:  # only the two attributes the name creator reads
        experiment_tag, trial_id = "3_alpha=0.1,gamma=2", "ab12cd34"

    name = TrialNamer(offset=1)(FakeTrial())
    assert name == "trial_002_ab12cd34" and trial_number(name) == 2


def test_concurrency_follows_cluster_and_trial_needs():
    gpu = cfg_with("scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=4", "scaling.data_cpus=1")
    assert experiment.trial_resources(gpu) == {"CPU": 8.25, "GPU": 2.0}
    assert experiment.max_concurrent(gpu, {"CPU": 64, "GPU": 8}, num_trials=10) == 4  # GPU-bound
    assert experiment.max_concurrent(gpu, {"CPU": 20, "GPU": 8}, num_trials=10) == 2  # CPU-bound (+1 data CPU)
    assert experiment.max_concurrent(gpu, {"CPU": 64, "GPU": 8}, num_trials=3) == 3  # no more than the trials
    capped = cfg_with("scaling.use_gpu=true", "tuning.max_concurrent_trials=1", "scaling.data_cpus=1")
    assert experiment.max_concurrent(capped, {"CPU": 64, "GPU": 8}, num_trials=10) == 1
    cpu = cfg_with("scaling.num_workers=1", "scaling.data_cpus=1")  # 1 worker x 1 CPU + 0.25 + 1 reserved for data
    assert experiment.max_concurrent(cpu, {"CPU": 4}, num_trials=3) == 1
    assert experiment.max_concurrent(cpu, {"CPU": 8}, num_trials=3) == 3
    # a trial that does not fit: refused, naming what it needs, unless nodes may come (scaling.capacity_wait_s)
    with pytest.raises(ConfigError, match=r"one trial needs \{'CPU': 2\.25\} .* has \{'CPU': 2\}.*capacity_wait_s"):
        experiment.max_concurrent(cpu, {"CPU": 2}, num_trials=3)
    waiting = cfg_with("scaling.num_workers=1", "scaling.data_cpus=1", "scaling.capacity_wait_s=600")
    assert experiment.max_concurrent(waiting, {"CPU": 2}, num_trials=3) == 1  # one at a time as nodes come


def test_asha_rungs_stop_before_the_last_epoch():
    cfg = cfg_with()
    asha = experiment.build_scheduler(cfg, epochs=4)
    assert asha is not None and asha._max_t == 3
    assert experiment.build_scheduler(cfg, epochs=1) is None  # nothing to stop early
    assert experiment.build_scheduler(cfg_with("tuning.scheduler=none"), epochs=4) is None
