"""A prepared shard folder (local or s3://): its manifest, label map, shard files, raw rows and COCO ground truth.

The folder is written by `pipelines.data.prepare` (see docs/data.md for the schema): ``manifest.json`` lists the
shards of the one run it describes, so readers never list the folder (and never read another run's files).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from cluster import s3
from retina.data.coco import DataError, LabelMap, coco_gt_from_rows

MANIFEST = "manifest.json"
META_COLUMNS = ["image_id", "file_name", "height", "width", "boxes", "labels", "crowd_boxes", "crowd_labels"]


# ------------------------------------------------------------------------------------------------ manifest


def load_manifest(location: str, settings: s3.S3Settings | None = None) -> dict[str, Any]:
    """The manifest of a prepared shard folder; DataError naming the path when it is missing or malformed."""
    path = s3.join(location, MANIFEST)
    try:
        manifest = json.loads(s3.read_bytes(path, settings))
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; run pipelines/prepare_data.py for this folder first") from None
    except ValueError as exc:
        raise DataError(f"{path}: malformed manifest: {exc}") from None
    if not manifest.get("shards"):
        raise DataError(f"{path}: the manifest lists no shards")
    return manifest


def label_map(manifest: dict[str, Any]) -> LabelMap:
    """Contiguous label ↔ COCO category id, from the manifest's categories."""
    return LabelMap.from_json(manifest["categories"])


def shard_paths(location: str, manifest: dict[str, Any]) -> list[str]:
    """Full paths of the shards this run wrote (never any other file in the folder)."""
    return [s3.join(location, s["path"]) for s in manifest["shards"]]


def settings_for(location: str) -> s3.S3Settings | None:
    return s3.S3Settings.from_env() if s3.is_s3(location) else None


def pass_order(paths: Sequence[str], passes: int, seed: int | None) -> list[str]:
    """`passes` passes over `paths` back to back, each in a new order drawn from (seed, pass), or as listed when
    `seed` is None: one Dataset execution then streams several epochs with no restart between them."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if seed is None:
        return list(paths) * passes
    return [paths[i] for p in range(passes) for i in np.random.default_rng((seed, p)).permutation(len(paths))]


def read_shards(
    location: str,
    columns: Sequence[str] | None = None,
    passes: int = 1,
    seed: int | None = None,
    read_tasks: int | None = None,
    block_rows: int | None = None,
    **read_kwargs: Any,
) -> ray.data.Dataset:
    """The listed shards as a Ray Dataset of raw shard rows (image bytes unless `columns` leaves them out).

    `passes` > 1: the rows of every shard `passes` times, pass after pass (`pass_order`; `seed` shuffles the
    shard order of each pass).

    `read_tasks`: read as a light stage in front of CPU-heavy work: one block per shard file, at most `read_tasks`
    reads in flight, reserving no CPU. A read reserving a CPU takes it from Ray Data's budget as long as shards
    are left to read, and on a small budget (the demo's 2 CPUs) the decode stage got none until every pass of the
    run had been read into the object store (15 s to the first batch of the demo instead of 7).

    `block_rows`: blocks of at most that many rows, streamed (no barrier). Ray 2.60 reads a Parquet file as one
    block (512 rows per shard by default), and map_batches never splits an input block across tasks: without this,
    one task decodes a whole shard while the other CPUs wait (measured: one process doing all the decoding of a
    300-image epoch, 47 img/s on 2 CPUs). When no shard the manifest lists is larger (the sample's 64 rows), the
    repartition stage is left out: its tasks hold a CPU each, taken from decoding."""
    settings = settings_for(location)
    manifest = load_manifest(location, settings)
    fs, _ = s3.arrow_filesystem(location, settings)
    listed = [s3.arrow_filesystem(p, settings)[1] for p in shard_paths(location, manifest)]
    paths = pass_order(listed, passes, seed) if passes > 1 else listed
    if read_tasks is not None:
        read_kwargs = {"override_num_blocks": len(paths), "num_cpus": 0, "concurrency": read_tasks, **read_kwargs}
    # Ray 2.60's default (V2) Parquet reader lists the files again at every execution (a ListFiles stage, then
    # ReadFiles): ~2 s more per epoch than the V1 reader on the benchmark, which resolves the explicit shard
    # list once (the manifest already names every file, so there is nothing to list).
    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=list(columns) if columns else None, **read_kwargs)
    finally:
        ctx.use_datasource_v2 = previous
    largest = max(int(s.get("num_rows", 0)) for s in manifest["shards"])  # 0: a manifest without per-shard counts
    if block_rows is not None and not 0 < largest <= block_rows:
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    return ds


# ------------------------------------------------------------------------------------------------ evaluation GT


def coco_gt_from_shards(location: str) -> dict[str, Any]:
    """COCO ground truth (images, annotations incl. iscrowd, original category ids) for pycocotools.

    Reads only the small columns, directly with pyarrow on the driver (no image bytes, no Ray tasks).
    """
    settings = settings_for(location)
    manifest = load_manifest(location, settings)
    rows: list[dict[str, Any]] = []
    for path in shard_paths(location, manifest):
        fs, inner = s3.arrow_filesystem(path, settings)
        try:
            with fs.open_input_file(inner) as f:
                table = pq.read_table(f, columns=META_COLUMNS)
        except OSError as exc:
            raise DataError(f"{path}: cannot read shard: {exc}") from None
        rows.extend(table.to_pylist())
    return coco_gt_from_rows(rows, label_map(manifest))


def check_shards(data: Any, num_classes: int) -> LabelMap:
    """The train shards' label map, after checking what a run needs of its shards: both splits prepared with the
    same categories, ``model.num_classes`` equal to their count, at least one global batch of train images.

    `data`: the run's ``DataConfig``. DataError / ConfigError naming the folder or the key.
    """
    from retina.typed_config import ConfigError

    train_manifest = load_manifest(data.train_shards, settings_for(data.train_shards))
    val_manifest = load_manifest(data.val_shards, settings_for(data.val_shards))
    labels = label_map(train_manifest)
    if label_map(val_manifest) != labels:
        raise DataError(f"{data.val_shards}: val categories differ from the train shards' {data.train_shards}")
    if num_classes != labels.num_classes:
        raise ConfigError(
            f"model.num_classes: {num_classes}, but {data.train_shards} has {labels.num_classes} "
            f"categories ({', '.join(labels.names)})"
        )
    written = train_manifest.get("counts", {}).get("images_written", data.batch_size)
    if written < data.batch_size:
        raise DataError(
            f"{data.train_shards}: {written} images, fewer than one batch of data.batch_size={data.batch_size}"
        )
    return labels


def num_images(location: str) -> int:
    """Images written into a prepared shard folder (its manifest's count)."""
    return int(load_manifest(location, settings_for(location)).get("counts", {}).get("images_written", 0))
