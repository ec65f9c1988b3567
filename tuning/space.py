"""The search space from the config's ``tuning`` section: validation, Tune/Optuna domains, searchers.

Four hyperparameters can be searched; each maps onto one key of the training config:

    gamma → model.loss.gamma (γ)   alpha → model.loss.alpha (α)   prior → model.head.prior (π)   lr → train.base_lr

A dimension is ``uniform``/``loguniform`` over [low, high], a ``choice`` of values, or ``fixed`` (not searched:
the base config's value). The ranges are checked when the config loads (`tuning.config.validate_tuning`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pipelines.config import Config
from pipelines.names import VAL_AP
from tuning.config import SearchDimConfig, TuningConfig

METRIC = VAL_AP  # what every trial maximises
MODE = "max"


@dataclass(frozen=True)
class Dimension:
    name: str  # key in tuning.* and in a trial's config
    target: tuple[str, ...]  # where the value goes in the training config
    log_scale: bool  # plotted on a log axis


DIMENSIONS = (
    Dimension("gamma", ("model", "loss", "gamma"), False),
    Dimension("alpha", ("model", "loss", "alpha"), False),
    Dimension("prior", ("model", "head", "prior"), True),
    Dimension("lr", ("train", "base_lr"), True),
)


def searched(t: TuningConfig) -> list[Dimension]:
    """The dimensions that vary between trials, in table order."""
    return [d for d in DIMENSIONS if getattr(t, d.name).kind != "fixed"]


# ------------------------------------------------------------------------------------------------ spaces


def tune_space(t: TuningConfig) -> dict[str, Any]:
    """Tune domains for the searched dimensions (Optuna converts them to its own distributions)."""
    space: dict[str, Any] = {}
    for d in searched(t):
        s = getattr(t, d.name)
        if s.kind == "choice":
            space[d.name] = tune.choice(list(s.values))
        elif s.kind == "loguniform":
            space[d.name] = tune.loguniform(s.low, s.high)
        else:
            space[d.name] = tune.uniform(s.low, s.high)
    return space


def grid_points(s: SearchDimConfig, n: int) -> list[float]:
    """The grid's values for one dimension: its `values` when given, else n points spanning [low, high]."""
    if s.values:
        return [float(v) for v in s.values]
    if n == 1:  # the middle of the range (geometric middle for a log range)
        return [math.sqrt(s.low * s.high) if s.kind == "loguniform" else (s.low + s.high) / 2]
    if s.kind == "loguniform":
        return [float(v) for v in np.geomspace(s.low, s.high, n)]
    return [float(v) for v in np.linspace(s.low, s.high, n)]


def grid_space(t: TuningConfig) -> dict[str, Any]:
    """tune.grid_search over every searched dimension: one trial per combination (num_samples is not used)."""
    return {d.name: tune.grid_search(grid_points(getattr(t, d.name), t.grid_points)) for d in searched(t)}


def grid_size(t: TuningConfig) -> int:
    return math.prod(len(grid_points(getattr(t, d.name), t.grid_points)) for d in searched(t))


def build_searcher(t: TuningConfig) -> Searcher | None:
    """Seeded Optuna searcher for tpe/random (same seed → same suggestions); None for grid (Tune's generator)."""
    if t.search_alg == "grid":
        return None
    import optuna

    if t.search_alg == "tpe":
        sampler = optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.tpe_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=t.seed)
    # Optuna distributions, converted here (Tune would convert a param_space itself, but then the searcher
    # could not be sampled on its own, as the reproducibility test does).
    space = OptunaSearch.convert_search_space(tune_space(t))
    return OptunaSearch(space=space, metric=METRIC, mode=MODE, sampler=sampler)


# ------------------------------------------------------------------------------------------------ trials


def apply_hyperparameters(base: Config, params: dict[str, Any]) -> Config:
    """The training config of one trial: `base` with the trial's γ, α, π (, lr) in place, checked once."""
    cfg = copy.deepcopy(base)
    for d in DIMENSIONS:
        if d.name in params:
            section = cfg
            for part in d.target[:-1]:
                section = getattr(section, part)
            setattr(section, d.target[-1], float(params[d.name]))
    Config.check(cfg)  # the training sections' rules (a SearchConfig's tuning section was checked at load)
    return cfg
