"""The config section the input pipeline reads (`DataConfig`): where the shards are, the sample data to generate,
augmentation, batch sizes and shuffling. Composed into `pipelines.config.Config`."""

from __future__ import annotations

from dataclasses import dataclass, field

from retina.typed_config import require


@dataclass
class DataConfig:
    # Sample data: when train/val shards are missing and `synthetic_images` > 0, the pipeline generates the
    # synthetic dataset under `root` and prepares its shards on first use.
    root: str = "data/sample"
    train_shards: str = "data/sample/shards/train"
    val_shards: str = "data/sample/shards/val"
    synthetic_images: int = 0  # 0: never generate; the shards must exist
    synthetic_seed: int = 0
    train_min_sizes: list[int] = field(default_factory=list)  # multi-scale training; empty = model.input.min_size
    flip_prob: float = 0.5
    batch_size: int = 16  # global images per step, split across workers
    val_batch_size: int = 8  # per worker
    synthetic_val_images: int = 0  # size of the generated val split (its own seed: synthetic_seed + 1)
    # every epoch a new shard order and rows permuted within each decode task (pipelines/data/plan.py); false:
    # the same order every epoch (shards by first image id, rows as stored)
    shuffle: bool = True

    def check(self) -> None:
        """The data section's range rules; ConfigError naming the key."""
        require(0 <= self.flip_prob <= 1, "data.flip_prob", "must be in [0, 1]")
        require(self.batch_size >= 1 and self.val_batch_size >= 1, "data.batch_size", "must be >= 1")
        require(all(s > 0 for s in self.train_min_sizes), "data.train_min_sizes", "must be > 0")
        require(self.synthetic_images >= 0, "data.synthetic_images", "must be >= 0")
        require(self.synthetic_val_images >= 0, "data.synthetic_val_images", "must be >= 0")
