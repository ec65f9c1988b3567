"""First-use set-up of the synthetic sample dataset (smoke and demo configs work from a fresh clone).

When ``data.synthetic_images > 0`` and a split's shards have no manifest yet, the split is generated with
`retina.data.synthetic.generate` under ``data.root/<split>`` (train: ``synthetic_seed``, val: seed + 1, so the
splits never share an image) and prepared into Parquet shards with `pipelines.prepare_data.prepare`. Existing
shards are never touched. Needs Ray (prepare runs on Ray Data).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cluster import s3
from pipelines.data.prepare import prepare
from pipelines.data.settings import DataConfig
from pipelines.data.shards import MANIFEST
from retina.data import synthetic

logger = logging.getLogger("retina.sample_data")


def _ensure_split(root: Path, split: str, shards: str, num_images: int, seed: int) -> bool:
    if s3.exists(s3.join(shards, MANIFEST)):
        return False
    if s3.is_s3(shards):
        raise FileNotFoundError(f"{shards}: no prepared shards; the sample data is only generated on local paths")
    source = root / split
    if not (source / "annotations.json").exists():
        logger.info("generating %d synthetic %s images (seed %d) in %s", num_images, split, seed, source)
        tmp = root / f".{split}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.generate(tmp, num_images, seed)
        shutil.rmtree(source, ignore_errors=True)
        tmp.rename(source)  # a crash mid-generation leaves only the .tmp folder
    logger.info("preparing shards for %s into %s", source, shards)
    prepare(str(source / "annotations.json"), str(source / "images"), shards, rows_per_shard=64, overwrite=True)
    return True


def ensure_sample_data(data: DataConfig) -> list[str]:
    """Generate + prepare whichever sample splits are missing; return the shard folders it created."""
    if data.synthetic_images <= 0:
        return []
    root = Path(data.root)
    created = []
    splits = [
        ("train", data.train_shards, data.synthetic_images, data.synthetic_seed),
        ("val", data.val_shards, data.synthetic_val_images or max(1, data.synthetic_images // 4),
         data.synthetic_seed + 1),
    ]  # fmt: skip
    for split, shards, num_images, seed in splits:
        if _ensure_split(root, split, shards, num_images, seed):
            created.append(shards)
    return created
