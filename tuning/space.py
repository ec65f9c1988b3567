"""The search space from the config's ``tuning`` section: validation, Tune/Optuna domains, searchers.

Four hyperparameters can be searched; each maps onto one key of the training config:

    gamma → model.loss.gamma (γ)   alpha → model.loss.alpha (α)   prior → model.head.prior (π)   lr → train.base_lr

A dimension is ``uniform``/``loguniform`` over [low, high], a ``choice`` of values, or ``fixed`` (not searched:
the base config's value). Every range is checked against what the model accepts (γ ≥ 0, α in [0, 1] or < 0 to
disable α-weighting, π in (0, 1), lr > 0) before any trial starts, so a typo fails in a second instead of as a
sweep of crashed trials.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from retina.config import Config, ConfigError, SearchDimConfig, TuningConfig, config_from_dict, to_dict

METRIC = "val/AP"
MODE = "max"
SEARCH_ALGS = ("tpe", "random", "grid")
SCHEDULERS = ("asha", "none")
KINDS = ("uniform", "loguniform", "choice", "fixed")


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
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def searched(t: TuningConfig) -> list[Dimension]:
    """The dimensions that vary between trials, in table order."""
    return [d for d in DIMENSIONS if getattr(t, d.name).kind != "fixed"]


# ------------------------------------------------------------------------------------------------ checks


def _check_value(dim: str, key: str, v: float, *, allow_disabled: bool = False) -> None:
    """Raise ConfigError naming `key` when `v` is outside what the model accepts for `dim`."""
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number, got {v!r}")
    if dim == "gamma" and v < 0:
        raise ConfigError(f"{key}: γ must be >= 0, got {v}")
    if dim == "alpha" and (v > 1 or (v < 0 and not allow_disabled)):
        raise ConfigError(f"{key}: α must be in [0, 1] (a choice value < 0 disables α-weighting), got {v}")
    if dim == "prior" and not 0 < v < 1:
        raise ConfigError(f"{key}: π must be in (0, 1), got {v}")
    if dim == "lr" and v <= 0:
        raise ConfigError(f"{key}: the learning rate must be > 0, got {v}")


def _check_dimension(name: str, d: SearchDimConfig, grid: bool) -> None:
    key = f"tuning.{name}"
    if d.kind not in KINDS:
        raise ConfigError(f"{key}.kind: must be one of {', '.join(KINDS)}, got {d.kind!r}")
    if d.kind == "fixed":
        return
    if d.kind == "choice" and not d.values:
        raise ConfigError(f"{key}.values: a choice needs at least one value")
    for i, v in enumerate(d.values):
        # Only a choice can switch α-weighting off: a range through negative values would mix both regimes.
        _check_value(name, f"{key}.values[{i}]", v, allow_disabled=d.kind == "choice")
    if d.kind in ("uniform", "loguniform") and not (grid and d.values):
        _check_value(name, f"{key}.low", d.low)
        _check_value(name, f"{key}.high", d.high)
        if not d.low < d.high:
            raise ConfigError(f"{key}: needs low < high, got low={d.low}, high={d.high}")
        if d.kind == "loguniform" and d.low <= 0:
            raise ConfigError(f"{key}.low: a loguniform range needs low > 0, got {d.low}")


def validate_tuning(cfg: Config) -> None:
    """Every tuning.* setting and every range of the space; ConfigError naming the key. Runs before Ray starts."""
    t = cfg.tuning
    if t.name and not _NAME.fullmatch(t.name):
        raise ConfigError("tuning.name: must be 1-100 characters of [A-Za-z0-9_.-]")
    if t.num_samples < 1:
        raise ConfigError(f"tuning.num_samples: must be >= 1, got {t.num_samples}")
    if t.max_concurrent_trials < 0:
        raise ConfigError("tuning.max_concurrent_trials: must be >= 0 (0: as many as the cluster fits)")
    if t.search_alg not in SEARCH_ALGS:
        raise ConfigError(f"tuning.search_alg: must be one of {', '.join(SEARCH_ALGS)}, got {t.search_alg!r}")
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"tuning.scheduler: must be one of {', '.join(SCHEDULERS)}, got {t.scheduler!r}")
    if t.tpe_startup_trials < 0:
        raise ConfigError("tuning.tpe_startup_trials: must be >= 0")
    if t.grid_points < 1:
        raise ConfigError("tuning.grid_points: must be >= 1")
    if t.grace_period < 1:
        raise ConfigError("tuning.grace_period: must be >= 1 (epochs)")
    if t.reduction_factor < 2:
        raise ConfigError("tuning.reduction_factor: must be >= 2")
    if t.driver_cpus <= 0:
        raise ConfigError("tuning.driver_cpus: must be > 0 (a Tune trial needs some resource to be scheduled)")
    if t.max_failures < -1:
        raise ConfigError("tuning.max_failures: must be >= 0 (or -1: retry forever)")
    if any(i < 0 for i in t.nan_trials):
        raise ConfigError("tuning.nan_trials: trial indices must be >= 0")
    for d in DIMENSIONS:
        _check_dimension(d.name, getattr(t, d.name), grid=t.search_alg == "grid")
    if not searched(t):
        raise ConfigError("tuning: every dimension (gamma, alpha, prior, lr) is fixed; nothing to search")


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
    """The training config of one trial: `base` with the trial's γ, α, π (, lr) in place, re-validated."""
    data = copy.deepcopy(to_dict(base))
    for d in DIMENSIONS:
        if d.name in params:
            section = data
            for part in d.target[:-1]:
                section = section[part]
            section[d.target[-1]] = float(params[d.name])
    return config_from_dict(data)
