"""Shared pieces of the training tests: the smoke sample data (generated once per session) and config overrides.

from tests._train_helpers import smoke_data  # noqa: F401  (pytest finds the fixture by name)
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_data(ray_local, tmp_path_factory) -> dict[str, str]:
    """The smoke config's synthetic data, generated + prepared once (idempotent if several modules import this)."""
    from pipelines.config import load_config
    from pipelines.data.sample import ensure_sample_data

    root = tmp_path_factory.getbasetemp() / "smoke-data"
    paths = {"root": str(root), "train_shards": str(root / "shards/train"), "val_shards": str(root / "shards/val")}
    cfg = load_config(SMOKE_CONFIG, data_overrides(paths))
    ensure_sample_data(cfg.data)
    return paths


def data_overrides(paths: dict[str, str]) -> list[str]:
    return [f"data.{key}={value}" for key, value in paths.items()]
