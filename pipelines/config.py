"""The run config of a training job: each layer's sections composed into one typed object: model (the library,
`retina.config`), data (the input pipeline, `pipelines.data.settings`), train, scaling and run (the training layer,
`pipelines.training.settings`) and tracking (MLflow, `pipelines.tracking.settings`). Loaded and checked once per
process (`retina.typed_config`), then passed as it is (Ray pickles it into the workers).

    cfg = load_config("configs/demo.yaml", ["train.max_steps=100"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.data.settings import DataConfig
from pipelines.tracking.settings import TrackingConfig
from pipelines.training.settings import RunConfig, ScalingConfig, TrainConfig
from retina import typed_config
from retina.config import ModelConfig
from retina.typed_config import ConfigError, require

__all__ = ["Config", "ConfigError", "load_config"]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def per_worker_batch(self) -> int:
        """Images per worker and step: the full group's share of data.batch_size, kept when an elastic run has
        fewer workers (its global batch shrinks with it; docs/cluster.md)."""
        return self.data.batch_size // self.scaling.num_workers

    def check(self) -> None:
        """Every section's range rules, then the rules that span sections; ConfigError naming the key."""
        for section in (self.model, self.data, self.train, self.scaling, self.run, self.tracking):
            section.check()
        require(
            self.data.batch_size % self.scaling.num_workers == 0,
            "data.batch_size",
            f"{self.data.batch_size} images per step do not split evenly over scaling.num_workers="
            f"{self.scaling.num_workers}",
        )
        require(
            self.train.amp != "fp16" or self.scaling.use_gpu,
            "train.amp",
            "fp16 needs scaling.use_gpu=true (use bf16 or none on CPU)",
        )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """A YAML run config (or the defaults when `path` is None) plus ``section.key=value`` overrides, checked."""
    return typed_config.load_config(path, overrides, cls=Config)


def config_from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """A Config from its plain-dict form (``dataclasses.asdict``; what checkpoints and MLflow store)."""
    return typed_config.config_from_dict(data, overrides, cls=Config)
