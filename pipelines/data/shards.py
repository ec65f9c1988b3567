"""A prepared shard folder (local or s3://): its manifest, label map, shard files, raw rows and COCO ground truth.

The folder is written by `pipelines.data.prepare` (see docs/data.md for the schema): ``manifest.json`` lists the
shards of the one run it describes, so readers never list the folder (and never read another run's files).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster import s3
from pipelines.data.plan import Shard, ShardIndex
from retina.data.coco import DataError, LabelMap, coco_gt_from_rows

MANIFEST = "manifest.json"
FORMAT = "retina-shards/1"  # the manifest and shard layout this version writes and reads
META_COLUMNS = ["image_id", "file_name", "height", "width", "boxes", "labels", "crowd_boxes", "crowd_labels"]


# ------------------------------------------------------------------------------------------------ manifest


def load_manifest(
    location: str, settings: s3.S3Settings | None = None, *, missing_ok: bool = False, any_format: bool = False
) -> dict[str, Any] | None:
    """The manifest of a prepared shard folder, checked to be of this version's `FORMAT`; DataError naming the path
    when it is missing (None instead with `missing_ok`), malformed, of another format (unless `any_format`: a
    prepare run about to replace it) or lists no shards."""
    path = s3.join(location, MANIFEST)
    try:
        manifest = json.loads(s3.read_bytes(path, settings))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise DataError(f"{path}: no manifest; run pipelines/prepare_data.py for this folder first") from None
    except ValueError as exc:
        raise DataError(f"{path}: malformed manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: malformed manifest: not a mapping")
    if manifest.get("format") != FORMAT and not any_format:
        raise DataError(f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}; prepare the "
                        "data again (pipelines/prepare_data.py --overwrite)")  # fmt: skip
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


def _read_columns(path: str, columns: Sequence[str], settings: s3.S3Settings | None) -> pa.Table:
    fs, inner = s3.arrow_filesystem(path, settings)
    try:
        with fs.open_input_file(inner) as f:
            return pq.read_table(f, columns=list(columns))
    except (OSError, pa.ArrowException) as exc:  # a missing file, or a truncated one (ArrowInvalid: no footer)
        raise DataError(f"{path}: cannot read shard: {exc}") from None


def shard_index(location: str) -> ShardIndex:
    """The plan's view of a prepared folder (`pipelines.data.plan`): every listed shard's image ids and the rows
    training uses (not the crowd-only images). Reads three small columns of each shard, never the image bytes."""
    settings = settings_for(location)
    manifest = load_manifest(location, settings)
    shards = []
    for path in shard_paths(location, manifest):
        table = _read_columns(path, ["image_id", "labels", "crowd_boxes"], settings)
        ids = table.column("image_id").to_pylist()
        labels = table.column("labels").to_pylist()
        crowd = table.column("crowd_boxes").to_pylist()
        # only crowd regions: no target and no trustworthy background (the manifest counts them)
        usable = tuple(i for i in range(len(ids)) if labels[i] or not crowd[i])
        shards.append(Shard(path, tuple(int(i) for i in ids), usable))
    return ShardIndex.of(shards)


def read_rows(path: str, rows: Sequence[int], columns: Sequence[str], settings: s3.S3Settings | None) -> pa.Table:
    """Rows `rows` of one shard file, in that order: only the row groups holding them are read."""
    fs, inner = s3.arrow_filesystem(path, settings)
    try:
        with fs.open_input_file(inner) as f:
            parquet = pq.ParquetFile(f)
            starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            groups = sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows})
            table = parquet.read_row_groups(groups, columns=list(columns))
    except (OSError, pa.ArrowException) as exc:  # a missing file, or a truncated one (ArrowInvalid: no footer)
        raise DataError(f"{path}: cannot read shard: {exc}") from None
    # row r sits at r - starts[g] inside group g, after the rows of the groups read before it
    offset = {g: int(sum(starts[h + 1] - starts[h] for h in groups[:i]) - starts[g]) for i, g in enumerate(groups)}
    where = [r + offset[int(np.searchsorted(starts, r, side="right")) - 1] for r in rows]
    return table.take(pa.array(where, type=pa.int64()))


# ------------------------------------------------------------------------------------------------ evaluation GT


def coco_gt_from_shards(location: str) -> dict[str, Any]:
    """COCO ground truth (images, annotations incl. iscrowd, original category ids) for pycocotools.

    Reads only the small columns, directly with pyarrow on the driver (no image bytes, no Ray tasks).
    """
    settings = settings_for(location)
    manifest = load_manifest(location, settings)
    rows: list[dict[str, Any]] = []
    for path in shard_paths(location, manifest):
        rows.extend(_read_columns(path, META_COLUMNS, settings).to_pylist())
    return coco_gt_from_rows(rows, label_map(manifest))


def check_shards(data: Any, num_classes: int) -> LabelMap:
    """The train shards' label map, after checking what a run needs of its shards' categories: both splits
    prepared with the same ones, ``model.num_classes`` equal to their count (whether the train split holds a batch
    is the data plan's check: `pipelines.training.run.prepare_run`).

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
    return labels
