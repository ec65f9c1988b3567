"""A rank's share of a data plan (`pipelines.data.plan`) as a lazily executed Ray Dataset of model-ready rows, and
the collate function that turns its rows into batches.

How training consumes it (in each worker)::

    chunks = plan.chunks(rank, world, start, steps)              # which rows, in which order (no Ray)
    ds = chunk_dataset(chunks, train_decode(cfg), ordered=True)  # one decode task per chunk
    for batch in ds.iter_torch_batches(batch_size=b, collate_fn=make_collate_fn(cfg.model.input)): ...

Each rank builds and runs its own Dataset: its rows are a pure function of the plan, its rank and the step it
starts at, so the same seed gives the same batches and a restart continues where the run stopped; no split
coordinator decides at run time which rank gets which block.

The heavy work (read the chunk's rows of a shard, decode, resize, flip) runs in ``map_batches`` tasks on CPU; each
output row holds the resized image as uint8 (h, w, 3) — 4x less Arrow/object-store traffic than float32 — and the
collate function only normalises and pads (see the batch contract in `retina.data.collate`). `ordered` keeps the
tasks' outputs in chunk order (Ray Data's ``preserve_order``): without it a task that finishes early overtakes
the ones before it, and the batches depend on timing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster import s3
from pipelines.data.plan import Chunk, ShardIndex, augment_key, val_chunks
from pipelines.data.shards import read_rows
from retina.data.coco import DataError
from retina.data.transforms import EvalTransform, TrainAugment, decode_image

if TYPE_CHECKING:
    from retina.data.collate import BatchCollator

# What a decode task reads of a shard (everything but the crowd columns, which only evaluation's ground truth needs).
DECODE_COLUMNS = ("image_id", "file_name", "height", "width", "image", "boxes", "labels")


@dataclass(frozen=True)
class Decode:
    """What a decode task does to each row of its chunk."""

    transform: Any  # TrainAugment (train) or EvalTransform (val)
    seed: int | None  # train: scale and flip drawn from augment_key(seed, epoch, image id); None: no augmentation
    s3_settings: s3.S3Settings | None  # how tasks reach s3:// shards (resolved once, on the driver)


def train_decode(cfg: Any, s3_settings: s3.S3Settings | None = None) -> Decode:
    """A run config's train decoding: multi-scale shorter sides (data.train_min_sizes, else model.input.min_size),
    the flip probability, the run's seed."""
    inp = cfg.model.input
    sizes = list(cfg.data.train_min_sizes) or [inp.min_size]
    return Decode(TrainAugment(sizes, inp.max_size, cfg.data.flip_prob), cfg.train.seed, s3_settings)


def val_decode(input_cfg: Any, s3_settings: s3.S3Settings | None = None) -> Decode:
    """Evaluation's decoding: the model's input size, no augmentation."""
    return Decode(EvalTransform(input_cfg.min_size, input_cfg.max_size), None, s3_settings)


def _decode_row(row: dict[str, Any], decode: Decode, epoch: int) -> Any:
    name = f"shard row image id {row['image_id']} ({row['file_name']})"
    image = decode_image(row["image"], name).image  # (H, W, 3) uint8
    if image.shape[:2] != (row["height"], row["width"]):
        raise DataError(f"{name}: decoded size {image.shape[:2]} differs from the shard's height/width")
    rng = np.random.default_rng(augment_key(decode.seed, epoch, row["image_id"])) if decode.seed is not None else None
    boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(row["labels"], dtype=np.int64)
    return decode.transform(image, boxes, labels, int(row["image_id"]), rng)


def decode_chunk(batch: dict[str, np.ndarray], decode: Decode) -> dict[str, Any]:
    """map_batches UDF: one chunk (its epoch and pieces) → its model-ready rows, in the chunk's order.

    Output columns per row: "image" uint8 (h, w, 3), "image_size" int64 (2,) (h, w) after resize, "orig_size"
    int64 (2,), "boxes" float32 flattened xyxy in resized pixels, "labels" int64, "image_id" int64.
    """
    out: dict[str, list[Any]] = {k: [] for k in ("image", "image_size", "orig_size", "boxes", "labels", "image_id")}
    for epoch, pieces in zip(batch["epoch"], batch["pieces"], strict=True):
        for path, rows in json.loads(pieces):
            table = read_rows(path, rows, DECODE_COLUMNS, decode.s3_settings)
            for row in table.to_pylist():
                sample = _decode_row(row, decode, int(epoch))
                out["image"].append(sample.image)
                out["image_size"].append(np.asarray(sample.image_size, dtype=np.int64))
                out["orig_size"].append(np.asarray(sample.orig_size, dtype=np.int64))
                out["boxes"].append(sample.boxes.reshape(-1))
                out["labels"].append(sample.labels)
                out["image_id"].append(sample.image_id)
    return {
        "image": out["image"],  # ragged → Ray stores a variable-shaped tensor column
        "image_size": np.stack(out["image_size"]),
        "orig_size": np.stack(out["orig_size"]),
        "boxes": out["boxes"],
        "labels": out["labels"],
        "image_id": np.asarray(out["image_id"], dtype=np.int64),
    }


def chunk_dataset(
    chunks: Sequence[Chunk], decode: Decode, *, ordered: bool, task_options: dict[str, Any] | None = None
) -> ray.data.Dataset:
    """A Dataset of the chunks' decoded rows: one decode task per chunk, outputs in chunk order when `ordered`.

    `task_options`: Ray options of the decode tasks (e.g. the placement group reserved for decoding)."""
    items = [{"epoch": c.epoch, "pieces": json.dumps(c.pieces)} for c in chunks]
    if not items:
        raise ValueError("no chunks to decode")
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block, hence one task, per chunk
    ds.context.execution_options.preserve_order = ordered
    return ds.map_batches(decode_chunk, batch_size=1, batch_format="numpy", fn_kwargs={"decode": decode},
                          **(task_options or {}))  # fmt: skip


def val_dataset(
    index: ShardIndex,
    input_cfg: Any,
    batch: int,
    *,
    rank: int = 0,
    world: int = 1,
    s3_settings: s3.S3Settings | None = None,
    task_options: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """The val split (rank `rank`'s part of it) for evaluation: every row once, in index order, unaugmented, in the
    same batches of `batch` at every evaluation (training's, and `pipelines/evaluate.py`'s with world 1)."""
    return chunk_dataset(val_chunks(index, rank, world, batch), val_decode(input_cfg, s3_settings), ordered=True,
                         task_options=task_options)  # fmt: skip


class RayCollateFn(NumpyBatchCollateFn):
    """`BatchCollator` in the class form Ray Data asks for (plain functions are deprecated since Ray 2.47)."""

    def __init__(self, collator: BatchCollator) -> None:
        super().__init__()
        self.collator = collator

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.collator(batch)


def make_collate_fn(input_cfg: Any | None = None) -> RayCollateFn:
    """``collate_fn`` for ``iter_torch_batches``: normalise with InputConfig's mean/std, pad to size_divisible."""
    # imported here: the collator needs torch, and this module is imported by every process that unpickles a
    # Dataset plan (see `retina.data.transforms._resize_boxes`); only the training workers collate
    from retina.data.collate import BatchCollator

    return RayCollateFn(BatchCollator.from_input_config(input_cfg) if input_cfg is not None else BatchCollator())
