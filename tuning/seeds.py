"""Seeds in the search (``tuning.seeds: N``): every sampled configuration trains N times, with ``train.seed`` =
base, base + 1, ..., base + N - 1 (base: the search config's own ``train.seed``), so that settings whose val/AP
differ by less than the seed-to-seed noise can be told apart (`tuning.configurations` groups the trials back).

Each seed is its own Tune trial; the trial's config carries its seed under `SEED_KEY` next to γ, α, π (, lr).
How the trials are made depends on who picks the hyperparameters:

- ``grid`` (Tune's `BasicVariantGenerator`): the seed is one more ``tune.grid_search`` dimension of the
  param_space, so each grid point runs once per seed. Tune expands the alphabetically first key fastest, so
  ``seed`` varies slowest: the whole grid runs with the first seed, then again with the next one (an interrupted
  study already has a complete grid).
- ``tpe`` / ``random`` (Optuna): a grid dimension cannot be used. Tune refuses ``grid_search`` in a param_space
  next to a searcher that has its own space, and its BasicVariantGenerator would resample every random dimension
  for each grid point (each seed would get other hyperparameters). `SeedRepeater` (Tune's `Repeater`) asks
  Optuna once per configuration and hands the same suggestion out N times, one per seed; Optuna is told the
  mean val/AP of the N seeds, so TPE models configurations, not lucky seeds.
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search import Repeater, Searcher
from ray.tune.search.repeater import TRIAL_INDEX

from pipelines.config import Config
from tuning.config import SearchConfig
from tuning.space import build_searcher, grid_size, grid_space

SEED_KEY = "seed"  # a trial's train.seed in its Tune config (absent with tuning.seeds = 1: the base seed)


def seed_values(cfg: SearchConfig) -> list[int]:
    """The seeds each configuration trains with: train.seed, train.seed + 1, ... (tuning.seeds of them)."""
    return [cfg.train.seed + i for i in range(cfg.tuning.seeds)]


def num_configurations(cfg: SearchConfig) -> int:
    """Hyperparameter settings the search tries: the grid's points, or tuning.num_samples suggestions."""
    return grid_size(cfg.tuning) if cfg.tuning.search_alg == "grid" else cfg.tuning.num_samples


def num_trials(cfg: SearchConfig) -> int:
    """Tune trials: one per configuration and seed."""
    return num_configurations(cfg) * cfg.tuning.seeds


def param_space(cfg: SearchConfig) -> dict[str, Any]:
    """The Tuner's param_space: the hyperparameter grid (grid search), crossed with the seeds when there are
    several; empty behind a searcher (Optuna holds its own space)."""
    if cfg.tuning.search_alg != "grid":
        return {}
    space = grid_space(cfg.tuning)
    if cfg.tuning.seeds > 1:
        space[SEED_KEY] = tune.grid_search(seed_values(cfg))
    return space


def searcher(cfg: SearchConfig) -> Searcher | None:
    """The Tuner's search_alg: None for grid (Tune's generator); Optuna, behind `SeedRepeater` with seeds > 1."""
    inner = build_searcher(cfg.tuning)
    if inner is None or cfg.tuning.seeds == 1:
        return inner
    return SeedRepeater(inner, seeds=cfg.tuning.seeds, base_seed=cfg.train.seed)


def tune_num_samples(cfg: SearchConfig) -> int:
    """TuneConfig.num_samples: 1 for a grid (the grid makes the trials), else every trial (the Repeater counts
    each repeat as one sample)."""
    return 1 if cfg.tuning.search_alg == "grid" else num_trials(cfg)


def with_seed(cfg: Config, params: dict[str, Any]) -> Config:
    """The trial's training config with its seed in train.seed (unchanged when its params carry none)."""
    if SEED_KEY not in params:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=int(params[SEED_KEY])))


class SeedRepeater(Repeater):
    """Tune's `Repeater` over an Optuna searcher: each suggestion runs `seeds` times, as consecutive trials, with
    ``config[SEED_KEY]`` = base_seed + its index; the searcher learns the mean of the seeds' final val/AP.

    Differences from Tune's own class, both for a search that must survive its driver (docs/search.md, Resume):
    its grouping is saved with the searcher (Tune's Repeater saves only the inner searcher, so a restored search
    would start a new configuration where one was half handed out, and fail on a trial it no longer knows), and
    a configuration whose every seed failed reaches Optuna as a failed trial instead of a NaN score.
    """

    def __init__(self, searcher: Searcher, seeds: int, base_seed: int):
        super().__init__(searcher, repeat=seeds, set_index=True)
        self.base_seed = base_seed

    def suggest(self, trial_id: str) -> dict | str | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config = dict(config)
            config[SEED_KEY] = self.base_seed + int(config.pop(TRIAL_INDEX))
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs: Any) -> None:
        group = self._trial_id_to_group.get(trial_id)
        if group is None:  # not handed out by this searcher (a restored search's older trial): nothing to tell
            return
        score = (result or {}).get(self.searcher.metric)
        group.report(trial_id, np.nan if score is None else float(score))
        if not group.finished_reporting():
            return
        scores = [s for s in group.scores() if not np.isnan(s)]
        kwargs.pop("error", None)
        if scores:
            self.searcher.on_trial_complete(group.primary_trial_id, {self.searcher.metric: float(np.mean(scores))},
                                            error=False, **kwargs)  # fmt: skip
        else:
            self.searcher.on_trial_complete(group.primary_trial_id, None, error=True, **kwargs)

    def save(self, checkpoint_path: str) -> None:
        """One file: this searcher's grouping and the inner searcher's own saved state."""
        with tempfile.TemporaryDirectory() as tmp:
            inner = Path(tmp) / "searcher.pkl"
            self.searcher.save(str(inner))
            state = {"repeater": self.get_state(), "searcher": inner.read_bytes()}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            inner = Path(tmp) / "searcher.pkl"
            inner.write_bytes(state["searcher"])
            self.searcher.restore(str(inner))
        self.set_state(state["repeater"])
