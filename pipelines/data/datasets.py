"""A rank's share of a data plan (`pipelines.data.plan`) as a stream of model-ready batches: one Ray task decodes
each chunk, the rank takes the chunks in plan order and cuts their rows into batches.

How training consumes it (in each worker)::

    chunks = plan.chunks(rank, world, start, steps)                    # which rows, in which order (no Ray)
    blocks = DecodeStream(chunks, train_decode(cfg), cpus, ordered=True)  # decoded chunk by chunk
    for batch in batches(blocks, b, make_collate_fn(cfg.model.input)): ...

Why each rank drives its own tasks, not a Ray Dataset split across the ranks: its rows are then a pure function of
the plan, its rank and the step it starts at (the same seed gives the same batches, a restart continues where the
run stopped), no split coordinator decides at run time which rank gets which block, and every rank decodes with a
fixed share of the CPUs reserved for decoding. (Running one Ray Dataset per rank instead, measured here, made the
executions compete for one budget: the first to start decoded its whole run ahead while the other rank waited.)

The heavy work (read the chunk's rows of a shard, decode, resize, flip) runs in the tasks; each row comes back
with the resized image as uint8 (h, w, 3) — 4x less data to move than float32 — and the collate function only
normalises and pads (see the batch contract in `retina.data.collate`). `ordered` takes the chunks in plan order;
without it the first decoded is taken first, and the batches depend on timing.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import s3
from pipelines.data.plan import Chunk, ShardIndex, augment_key, val_chunks
from pipelines.data.shards import read_rows
from retina.data.coco import DataError
from retina.data.transforms import EvalTransform, TrainAugment, decode_image

if TYPE_CHECKING:
    from retina.data.collate import BatchCollator

# What a decode task reads of a shard (everything but the crowd columns, which only evaluation's ground truth needs).
DECODE_COLUMNS = ("image_id", "file_name", "height", "width", "image", "boxes", "labels")
COLUMNS = ("image", "image_size", "orig_size", "boxes", "labels", "image_id")  # of a decoded block, one per row


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


def decode_chunk(chunk: Chunk, decode: Decode) -> dict[str, Any]:
    """One chunk → its model-ready rows, in the chunk's order (what a decode task returns).

    Columns, one entry per row: "image" uint8 (h, w, 3), "image_size" int64 (2,) (h, w) after resize, "orig_size"
    int64 (2,), "boxes" float32 flattened xyxy in resized pixels, "labels" int64, "image_id" int64.
    """
    out: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    for path, rows in chunk.pieces:
        for row in read_rows(path, rows, DECODE_COLUMNS, decode.s3_settings).to_pylist():
            sample = _decode_row(row, decode, chunk.epoch)
            out["image"].append(sample.image)
            out["image_size"].append(np.asarray(sample.image_size, dtype=np.int64))
            out["orig_size"].append(np.asarray(sample.orig_size, dtype=np.int64))
            out["boxes"].append(sample.boxes.reshape(-1))
            out["labels"].append(sample.labels)
            out["image_id"].append(sample.image_id)
    return out


_decode_task = ray.remote(decode_chunk)


@dataclass(frozen=True)
class DecodeCpus:
    """The CPUs one rank's decode tasks may use: its `share` of the run's reservation (`group`, a placement group
    of 1-CPU bundles), or of the cluster when `group` is None."""

    share: float
    group: Any = None  # ray.util.placement_group.PlacementGroup

    @property
    def in_flight(self) -> int:
        """Decode tasks a rank keeps submitted: its share of CPUs rounded up, plus one queued, so that a CPU whose
        task finished early (taken in order, it waits behind the one before) starts the next chunk at once."""
        return max(1, int(-(-self.share // 1))) + 1

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": min(1.0, self.share)}  # a share below one CPU: tasks of that size
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.group)
        return options


class DecodeStream:
    """A rank's decoded chunks (`decode_chunk` blocks): at most `cpus.in_flight` decode tasks running, taken in
    plan order (`ordered`) or as they finish. Iterating again starts over."""

    def __init__(self, chunks: Sequence[Chunk], decode: Decode, cpus: DecodeCpus, *, ordered: bool = True) -> None:
        if not chunks:
            raise ValueError("no chunks to decode")
        self.chunks, self.decode, self.cpus, self.ordered = list(chunks), decode, cpus, ordered

    def __iter__(self) -> Iterator[dict[str, Any]]:
        task = _decode_task.options(**self.cpus.task_options())
        decode = ray.put(self.decode)  # once, not with every task
        todo = iter(self.chunks)
        running: collections.deque[ray.ObjectRef] = collections.deque()
        for chunk in todo:
            running.append(task.remote(chunk, decode))
            if len(running) >= self.cpus.in_flight:
                break
        while running:
            if self.ordered:
                ref = running.popleft()
            else:
                [ref], _ = ray.wait(list(running), num_returns=1)
                running.remove(ref)
            block = ray.get(ref)  # re-raises the task's error (naming the shard row)
            chunk = next(todo, None)
            if chunk is not None:
                running.append(task.remote(chunk, decode))
            yield block


def batches(
    blocks: Iterable[dict[str, Any]], batch_size: int, collate: Callable[[dict[str, Any]], Any]
) -> Iterator[Any]:
    """Consecutive rows of `blocks` in batches of `batch_size` (the last one smaller when the rows run out), each
    through `collate` (a `retina.data.collate.BatchCollator`)."""
    pending: dict[str, list[Any]] = {k: [] for k in COLUMNS}
    for block in blocks:
        for k in COLUMNS:
            pending[k].extend(block[k])
        while len(pending["image_id"]) >= batch_size:
            yield collate(_take(pending, batch_size))
    if pending["image_id"]:
        yield collate(_take(pending, len(pending["image_id"])))


def _take(pending: dict[str, list[Any]], n: int) -> dict[str, Any]:
    """The first `n` rows of `pending` (removed from it) in the collator's form: ragged columns as lists."""
    rows = {k: v[:n] for k, v in pending.items()}
    for v in pending.values():
        del v[:n]
    return {**rows, "image_size": np.stack(rows["image_size"]), "orig_size": np.stack(rows["orig_size"]),
            "image_id": np.asarray(rows["image_id"], dtype=np.int64)}  # fmt: skip


def val_batches(
    index: ShardIndex,
    input_cfg: Any,
    batch: int,
    cpus: DecodeCpus,
    *,
    rank: int = 0,
    world: int = 1,
    s3_settings: s3.S3Settings | None = None,
) -> Iterator[Any]:
    """The val split (rank `rank`'s part of it) for evaluation: every row once, in index order, unaugmented, in the
    same batches of `batch` at every evaluation (training's, and `pipelines/evaluate.py`'s with world 1)."""
    blocks = DecodeStream(val_chunks(index, rank, world, batch), val_decode(input_cfg, s3_settings), cpus)
    return batches(blocks, batch, make_collate_fn(input_cfg))


def make_collate_fn(input_cfg: Any | None = None) -> BatchCollator:
    """The collate function: normalise with InputConfig's mean/std, pad to size_divisible (torch tensors out)."""
    # imported here: the collator needs torch, and this module is imported by processes that never collate (the
    # decode tasks): torch's import is ~1.5 s of CPU in each (see `retina.data.transforms._resize_boxes`)
    from retina.data.collate import BatchCollator

    return BatchCollator.from_input_config(input_cfg) if input_cfg is not None else BatchCollator()

