"""The config section only Ray Tune reads (`TuningConfig`: the search and its space), composed with the training
run's sections into `SearchConfig`, and its checks: every range of the space is checked against what the model
accepts (the same rules as the model's own config, `retina.config.check_*`) before Ray starts, so a typo fails in a
second instead of as a sweep of crashed trials."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.config import Config
from pipelines.training.settings import check_lr
from retina import config as rc
from retina import typed_config
from retina.typed_config import ConfigError, require

SEARCH_ALGS = ("tpe", "random", "grid")
SCHEDULERS = ("asha", "none")
KINDS = ("uniform", "loguniform", "choice", "fixed")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


@dataclass
class SearchDimConfig:
    """One hyperparameter of the search (ranges checked by `validate_tuning` before any trial starts)."""

    kind: str = "uniform"  # uniform | loguniform | choice (one of `values`) | fixed (the base config's value)
    low: float = 0.0
    high: float = 1.0
    values: list[float] = field(default_factory=list)  # choice: the candidates; grid: the points, when given


# One class per hyperparameter so that a partial override (`--set tuning.gamma.high=3`) keeps that
# hyperparameter's own defaults: the config loader fills a section from its class's field defaults.
@dataclass
class GammaSearchConfig(SearchDimConfig):  # model.loss.gamma
    high: float = 5.0


@dataclass
class AlphaSearchConfig(SearchDimConfig):  # model.loss.alpha
    low: float = 0.1
    high: float = 0.9


@dataclass
class PriorSearchConfig(SearchDimConfig):  # model.head.prior (π)
    kind: str = "loguniform"
    low: float = 1e-3
    high: float = 0.2


@dataclass
class LrSearchConfig(SearchDimConfig):  # train.base_lr; not searched unless its kind is set
    kind: str = "fixed"
    low: float = 1e-3
    high: float = 0.05


@dataclass
class TuningConfig:
    """Ray Tune search over the focal-loss hyperparameters (tuning/search.py); trials maximise val/AP."""

    name: str = ""  # Tune experiment name; "" = <run.name>_search. The same name + storage_path resumes
    storage_path: str = ""  # "" = run.storage_path
    num_samples: int = 8
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs/GPUs fit
    search_alg: str = "tpe"  # tpe (Optuna, seeded) | random (Optuna, seeded) | grid
    scheduler: str = "asha"  # asha (stops weak trials early, by epoch) | none
    seed: int = 0  # the searcher's (Optuna's) seed; the trials' training seed is train.seed
    # Trainings per configuration, with train.seed = base, base + 1, ... (base: train.seed); the table ranks the
    # configurations by their mean val/AP (tuning/seeds.py, tuning/configurations.py)
    seeds: int = 1
    tpe_startup_trials: int = 5  # random suggestions before TPE models the results
    grid_points: int = 3  # grid: evenly spaced points per searched range (log-spaced for loguniform)
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keeps the best 1/reduction_factor at each rung
    driver_cpus: float = 0.25  # the trial's own process (it only drives a TorchTrainer)
    # Extra Ray resources a trial's driver asks for, to keep it on nodes that are never preempted: a trial's driver
    # also hosts its Train controller and its data-split coordinators, so losing its node ends the whole trial.
    # E.g. {"head": 0.01} with `resources: {"head": 100}` on the head node (docs/cluster.md).
    driver_resources: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0  # Tune-level retries of a failed trial (worker failures: run.max_failures)
    gamma: GammaSearchConfig = field(default_factory=GammaSearchConfig)
    alpha: AlphaSearchConfig = field(default_factory=AlphaSearchConfig)
    prior: PriorSearchConfig = field(default_factory=PriorSearchConfig)
    lr: LrSearchConfig = field(default_factory=LrSearchConfig)


@dataclass
class SearchConfig(Config):
    """A training run's config plus the search over it."""

    tuning: TuningConfig = field(default_factory=TuningConfig)

    def check(self) -> None:
        super().check()
        validate_tuning(self.tuning)


def load_search_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SearchConfig:
    """A YAML search config (a run config with a ``tuning`` section) plus overrides, checked."""
    return typed_config.load_config(path, overrides, cls=SearchConfig)


# ------------------------------------------------------------------------------------------------ checks

# The range rule of each hyperparameter: the model's own (one owner, retina.config). A value < 0 switches
# α-weighting off; only a `choice` may do that (a range through negative values would mix both regimes).
RANGE_RULES: dict[str, Callable[..., None]] = {
    "gamma": lambda v, key, choice: rc.check_gamma(v, key),
    "alpha": lambda v, key, choice: rc.check_alpha(v, key, allow_disabled=choice),
    "prior": lambda v, key, choice: rc.check_prior(v, key),
    "lr": lambda v, key, choice: check_lr(v, key),
}


def _check_dimension(name: str, d: SearchDimConfig, grid: bool) -> None:
    key = f"tuning.{name}"
    if d.kind not in KINDS:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(KINDS)}, got {d.kind!r}")
    if d.kind == "fixed":
        return
    if d.kind == "choice" and not d.values:
        raise ConfigError(f"{key}.values: a choice needs at least one value")
    rule = RANGE_RULES[name]
    for i, v in enumerate(d.values):
        rule(v, f"{key}.values[{i}]", d.kind == "choice")
    if d.kind in ("uniform", "loguniform") and not (grid and d.values):
        rule(d.low, f"{key}.low", False)
        rule(d.high, f"{key}.high", False)
        if not d.low < d.high:
            raise ConfigError(f"{key}: needs low < high, got low={d.low}, high={d.high}")
        if d.kind == "loguniform" and d.low <= 0:
            raise ConfigError(f"{key}.low: a loguniform range needs low > 0, got {d.low}")


def validate_tuning(t: TuningConfig) -> None:
    """Every tuning.* setting and every range of the space; ConfigError naming the key."""
    require(not t.name or bool(_NAME.fullmatch(t.name)), "tuning.name", "must be 1-100 characters of [A-Za-z0-9_.-]")
    require(t.num_samples >= 1, "tuning.num_samples", f"must be >= 1, got {t.num_samples}")
    require(t.max_concurrent_trials >= 0, "tuning.max_concurrent_trials", "must be >= 0 (0: as many as fit)")
    require(t.search_alg in SEARCH_ALGS, "tuning.search_alg", f"must be one of {', '.join(SEARCH_ALGS)}")
    require(t.scheduler in SCHEDULERS, "tuning.scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    # the loader already refuses a non-integer; a TuningConfig built in code is checked here too (True is not 1)
    is_count = isinstance(t.seeds, int) and not isinstance(t.seeds, bool)
    require(is_count and t.seeds >= 1, "tuning.seeds", f"must be an integer >= 1, got {t.seeds!r}")
    require(t.tpe_startup_trials >= 0, "tuning.tpe_startup_trials", "must be >= 0")
    require(t.grid_points >= 1, "tuning.grid_points", "must be >= 1")
    require(t.grace_period >= 1, "tuning.grace_period", "must be >= 1 (epochs)")
    require(t.reduction_factor >= 2, "tuning.reduction_factor", "must be >= 2")
    require(t.driver_cpus > 0, "tuning.driver_cpus", "must be > 0 (a Tune trial needs some resource)")
    require(all(v > 0 for v in t.driver_resources.values()), "tuning.driver_resources", "must be > 0")
    require(t.max_failures >= -1, "tuning.max_failures", "must be >= 0 (or -1: retry forever)")
    for name in RANGE_RULES:
        _check_dimension(name, getattr(t, name), grid=t.search_alg == "grid")
    if all(getattr(t, name).kind == "fixed" for name in RANGE_RULES):
        raise ConfigError("tuning: every dimension (gamma, alpha, prior, lr) is fixed; nothing to search")
