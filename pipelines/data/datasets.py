"""Prepared shards (local or s3://) → lazily executed Ray Datasets of model-ready samples, and the collate function.

How training consumes it::

    train_ds, val_ds = datasets_from_config(cfg)
    trainer = TorchTrainer(..., datasets={"train": train_ds, "val": val_ds}, ...)
    # in the worker loop:
    collate = make_collate_fn(model_cfg.input)   # the batch contract of retina.data.collate
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=b, collate_fn=collate): ...

The heavy work (decode, resize, flip) runs in ``map_batches`` tasks on CPU; each output row holds the resized
image as uint8 (h, w, 3) — 4x less Arrow/object-store traffic than float32 — and the collate function only
normalises and pads (see the batch contract in `retina.data.collate`).

Randomness: every execution of a train dataset (one per epoch) reshuffles rows and redraws the scale/flip of
each image, reproducibly from `seed` (Ray's RandomSeedConfig / ``random()`` expression with
``reseed_after_execution``). Validation never augments; its rows come in shard (image id) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.expressions import random as random_expr

from pipelines.data.shards import read_shards
from retina.data.coco import DataError
from retina.data.transforms import EvalTransform, TrainAugment, decode_image

if TYPE_CHECKING:
    from retina.data.collate import BatchCollator

# Logical CPUs of the cluster per shard read in flight (each read reserves no CPU: see `read_shards`). Reading a
# shard is ~1/50 of the CPU time of decoding it (a 512-row COCO shard: ~80 MB, under a second from S3; decoding it
# at 800/1333: ~23 core-seconds), so one read per 32 CPUs keeps ahead of decoding with room to spare; the demo's
# 4 get one, and a second read's extra worker process made its first step ~2 s later (measured).
CPUS_PER_SHARD_READ = 32


def shard_reads() -> int:
    """Shard reads in flight for a Dataset built now: one per CPUS_PER_SHARD_READ logical CPUs of the cluster."""
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    return max(1, int(cpus // CPUS_PER_SHARD_READ))


# Rows per train decode task, in batches. Per-task overhead (scheduling, one object-store block per task output,
# the executor's bookkeeping) is paid per block: 8-row tasks ran at 85-90 img/s and 64-row tasks at 110-130 img/s
# on the data benchmark (2 CPUs, 1200 images at 512 px). With shuffle="files" it is also the permutation window.
TRAIN_TASK_BATCHES = 8


# ------------------------------------------------------------------------------------------------ samples


def _to_samples(
    batch: dict[str, np.ndarray], transform: Any, train: bool, image_format: str, permute: bool = False
) -> dict[str, Any]:
    """map_batches UDF: shard rows (encoded bytes) → model-ready rows; permute=True emits them in random order.

    Output columns per row: "image" uint8 (h, w, 3) [or float32 (3, h, w) normalised-free 0..1 when
    image_format="float32"], "image_size" int64 (2,) (h, w) after resize, "orig_size" int64 (2,), "boxes" float32
    flattened xyxy in resized pixels, "labels" int64, "image_id" int64.
    """
    out: dict[str, list[Any]] = {k: [] for k in ("image", "image_size", "orig_size", "boxes", "labels", "image_id")}
    seeds = batch.get("aug_seed")
    # sorting by the rows' own uniform draws is a uniform random permutation, new every epoch, reproducible
    order = np.argsort(seeds, kind="stable") if permute and seeds is not None else range(len(batch["image_id"]))
    for i in order:
        labels = np.asarray(batch["labels"][i], dtype=np.int64)
        if train and len(labels) == 0 and len(batch["crowd_boxes"][i]) > 0:
            continue  # only crowd regions: no target and no trustworthy background (counted in the manifest)
        name = f"shard row image id {batch['image_id'][i]} ({batch['file_name'][i]})"
        image = decode_image(batch["image"][i], name).image  # (H, W, 3) uint8
        if image.shape[:2] != (batch["height"][i], batch["width"][i]):
            raise DataError(f"{name}: decoded size {image.shape[:2]} differs from the shard's height/width")
        rng = np.random.default_rng(int(seeds[i] * 2**53)) if seeds is not None else None
        boxes = np.asarray(batch["boxes"][i], dtype=np.float32).reshape(-1, 4)
        sample = transform(image, boxes, labels, int(batch["image_id"][i]), rng)
        img = sample.image
        if image_format == "float32":
            img = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0  # (3, h, w) in 0..1
        out["image"].append(img)
        out["image_size"].append(np.asarray(sample.image_size, dtype=np.int64))
        out["orig_size"].append(np.asarray(sample.orig_size, dtype=np.int64))
        out["boxes"].append(sample.boxes.reshape(-1))
        out["labels"].append(sample.labels)
        out["image_id"].append(sample.image_id)
    if not out["image_id"]:
        return {k: np.empty((0,), dtype=np.int64) for k in out}  # keeps the block valid when all rows drop
    return {
        "image": out["image"],  # ragged → Ray stores a variable-shaped tensor column
        "image_size": np.stack(out["image_size"]),
        "orig_size": np.stack(out["orig_size"]),
        "boxes": out["boxes"],
        "labels": out["labels"],
        "image_id": np.asarray(out["image_id"], dtype=np.int64),
    }


def build_dataset(
    location: str,
    *,
    train: bool,
    min_sizes: Sequence[int],
    max_size: int,
    flip_prob: float = 0.5,
    seed: int | None = None,
    shuffle: str = "rows",
    batch_size: int = 16,
    image_format: str = "uint8",
    passes: int = 1,
) -> ray.data.Dataset:
    """Shards at `location` → a lazily executed Dataset of model-ready rows (see `_to_samples`).

    train=True: multi-scale (a random shorter side from `min_sizes`) + horizontal flip with `flip_prob`, rows
    reshuffled every epoch: shuffle="rows" (a full random_shuffle of the encoded rows, exact) or "files"
    (a new shard order every epoch and rows permuted within each decode task of TRAIN_TASK_BATCHES x
    `batch_size` rows: streamed without a barrier, as coarse as the shards are large).
    images containing only crowd regions are left out. train=False: resize to ``min_sizes[0]``, no
    augmentation, rows in shard order.

    `passes` (train, shuffle "files" or "none"): one execution streams that many epochs back to back, each pass a
    new shard order drawn from `seed` (see `pipelines.data.shards.pass_order`; decode tasks finish out of order, so
    rows near a pass boundary may cross it). Training asks for every epoch of
    the run in one execution: re-planning and re-starting the execution at each epoch stalled the workers for
    ~1.5 s per epoch on the demo, while one stream decodes the next epoch's first batches as the current one ends.
    """
    if image_format not in ("uint8", "float32"):
        raise ValueError(f"image_format must be uint8 or float32, got {image_format!r}")
    if shuffle not in ("rows", "files", "none"):
        raise ValueError(f"shuffle must be rows, files or none, got {shuffle!r}")
    if not min_sizes:
        raise ValueError("min_sizes must name at least one shorter-side size")
    if passes > 1 and (not train or shuffle == "rows"):
        raise ValueError("passes > 1 needs a train dataset with shuffle files or none (rows shuffles per execution)")
    permute = train and shuffle == "files"
    task_rows = batch_size * (TRAIN_TASK_BATCHES if train else 1)  # rows per decode task (val: one batch, in order)
    reads = shard_reads()
    if train:
        from ray.data import FileShuffleConfig
        from ray.data._internal.random_config import RandomSeedConfig

        if passes > 1:  # every pass a new shard order, drawn here; streamed, no barrier
            ds = read_shards(location, passes=passes, seed=seed if shuffle != "none" else None, read_tasks=reads,
                             block_rows=task_rows)  # fmt: skip
        else:  # a new shard order at every execution (epoch); streamed, no barrier
            file_shuffle = FileShuffleConfig(seed=seed, reseed_after_execution=True) if shuffle != "none" else None
            ds = read_shards(location, shuffle=file_shuffle, read_tasks=reads, block_rows=task_rows)
        if shuffle == "rows":
            ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
        # "files" has no all-to-all stage (randomize_block_order would hold every block of the epoch, i.e. the
        # whole dataset's bytes, in the object store before the first batch); instead each decode task takes
        # TRAIN_TASK_BATCHES batches of rows and emits them permuted (Ray's consumer-side
        # local_shuffle_buffer_size does the same mixing at ~7 ms of driver CPU per 512 px image, measured).
        # one uniform number per row and epoch seeds that row's scale/flip draw: reproducible, new every epoch
        ds = ds.with_column("aug_seed", random_expr(seed=seed, reseed_after_execution=True))
        transform: Any = TrainAugment(list(min_sizes), max_size, flip_prob)
    else:
        ds = read_shards(location, read_tasks=reads, block_rows=task_rows)
        ds.context.execution_options.preserve_order = True  # evaluation order = shard order (image id)
        transform = EvalTransform(int(min_sizes[0]), max_size)
    return ds.map_batches(
        _to_samples,
        batch_size=task_rows,
        batch_format="numpy",
        fn_kwargs={"transform": transform, "train": train, "image_format": image_format, "permute": permute},
    )


def datasets_from_config(cfg: Any, passes: int = 1) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(train, val) Datasets of a run config: the one builder that training, search trials, the tests and the data
    benchmark share. Reads data.* (locations, shuffle, batch sizes), model.input (sizes) and train.seed.

    `passes`: epochs the train Dataset streams in one execution (`build_dataset`); 1 with data.stream_epochs off or
    data.shuffle "rows" (an exact row shuffle is one all-to-all per epoch)."""
    inp = cfg.model.input
    train = build_dataset(
        cfg.data.train_shards,
        train=True,
        min_sizes=list(cfg.data.train_min_sizes) or [inp.min_size],
        max_size=inp.max_size,
        flip_prob=cfg.data.flip_prob,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        batch_size=cfg.data.batch_size,  # decode tasks of TRAIN_TASK_BATCHES global batches
        passes=passes if cfg.data.shuffle != "rows" and cfg.data.stream_epochs else 1,
    )
    val = build_dataset(
        cfg.data.val_shards,
        train=False,
        min_sizes=[inp.min_size],
        max_size=inp.max_size,
        batch_size=cfg.data.val_batch_size,
    )
    return train, val


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
