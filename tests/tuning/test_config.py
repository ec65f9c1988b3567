"""The search config (`tuning.config.SearchConfig`): a training run's config plus its ``tuning`` section, loaded and
checked in one go (the space is validated at load time, before Ray starts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipelines.config import Config
from retina.typed_config import ConfigError
from tuning.config import (
    KINDS,
    SCHEDULERS,
    SEARCH_ALGS,
    SearchConfig,
    TuningConfig,
    load_search_config,
    validate_tuning,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_search_sample_config_loads():
    cfg = load_search_config(CONFIGS / "search_sample.yaml")
    assert isinstance(cfg, SearchConfig) and isinstance(cfg, Config)  # a run config plus the search
    t = cfg.tuning
    assert (t.num_samples, t.search_alg, t.scheduler, t.tpe_startup_trials) == (4, "tpe", "asha", 2)
    assert cfg.run.name == "search_sample" and cfg.scaling.num_workers == 2
    assert (t.gamma.kind, t.gamma.low, t.gamma.high) == ("uniform", 0.0, 5.0)  # the section's own defaults


def test_a_run_config_is_a_search_with_the_default_space():
    cfg = load_search_config(CONFIGS / "smoke.yaml", ["tuning.num_samples=2"])
    assert cfg.tuning.num_samples == 2 and cfg.tuning.name == "" and cfg.tuning.prior.kind == "loguniform"


def test_the_space_is_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"search_sample\.yaml: tuning\.prior\.high: π must be in \(0, 1\)"):
        load_search_config(CONFIGS / "search_sample.yaml", ["tuning.prior.high=1.5"])
    # the training sections' rules still apply
    with pytest.raises(ConfigError, match="data.batch_size: 8 images per step do not split evenly"):
        load_search_config(CONFIGS / "search_sample.yaml", ["scaling.num_workers=3"])


def test_validate_tuning_on_the_section_itself():
    validate_tuning(TuningConfig())
    with pytest.raises(ConfigError, match="tuning.reduction_factor: must be >= 2"):
        validate_tuning(TuningConfig(reduction_factor=1))
    gamma = dataclasses.replace(TuningConfig().gamma, kind="choice")
    with pytest.raises(ConfigError, match="tuning.gamma.values: a choice needs at least one value"):
        validate_tuning(TuningConfig(gamma=gamma))
    assert "tpe" in SEARCH_ALGS and "asha" in SCHEDULERS and "fixed" in KINDS
