"""Which rows each rank reads, in which order, for every step of a run: a pure function of the shards, the seed and
the group, so that the same config and seed give every rank the same batches, and a restarted run continues the
interrupted epoch exactly where it stopped.

No Ray here: `pipelines.data.datasets` turns a plan into a Ray Dataset per rank.

    index = ShardIndex.read("data/sample/shards/train")          # row ids and usable rows of every shard
    plan = TrainPlan(index, seed=0, batch=8, shuffle=True)        # batch: images per rank and step
    plan.steps_per_epoch(world=2)                                 # the one definition of an epoch
    chunks = plan.chunks(rank=0, world=2, start=Position(0, 0), steps=1500)

**An epoch** (`TrainPlan.epoch_rows`): every usable train row once. The shards are visited in a new order every
epoch, drawn from (seed, epoch); rows keep their file order. ``shuffle=False`` keeps the index's order (shards by
first image id) every epoch.

**A rank's part** of an epoch: the sequence is cut into `world` contiguous, equal parts (the first ``rows % world``
one row longer), rank r taking part r; so a global batch holds rows from `world` places of the sequence, and no row is
read by two ranks. Every rank takes exactly `steps_per_epoch` batches of its part (``floor(rows / world / batch)``)
and leaves the rest of it: every rank steps the same number of times, and no batch spans two epochs.

**Chunks**: a rank's part is cut into chunks of `CHUNK_ROWS` rows, one decode task each; the rows of a chunk are
permuted with a generator keyed by (seed, epoch, rank, chunk), and the scale/flip of an image is drawn from
(seed, epoch, image id) (`augment_key`): nothing depends on which task finishes first.

**Resume**: a `Position` is (epoch, step in that epoch). The same world size continues mid-chunk at the exact row;
a different world size (an elastic restart) continues the epoch at the same share of its rows
(`Position.rescaled`): up to one global batch of that epoch's rows is seen twice or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Rows per decode task. Per-task overhead (scheduling, one object-store block per output) is paid per chunk: 8-row
# tasks decoded at 85-90 img/s and 64-row tasks at 110-130 img/s on the data benchmark (2 CPUs, 512 px images).
CHUNK_ROWS = 64


@dataclass(frozen=True)
class Shard:
    """One shard file as the plan sees it."""

    path: str  # full path (local or s3://)
    image_ids: tuple[int, ...]  # per row, in file order
    train_rows: tuple[int, ...]  # the rows training uses: all but crowd-only images (no target, no safe background)


@dataclass(frozen=True)
class ShardIndex:
    """Every shard of a prepared folder, ordered by first image id (so the order never depends on file names)."""

    shards: tuple[Shard, ...]

    @classmethod
    def of(cls, shards: Sequence[Shard]) -> ShardIndex:
        return cls(tuple(sorted(shards, key=lambda s: (s.image_ids[0] if s.image_ids else -1, s.path))))

    @property
    def num_train_rows(self) -> int:
        return sum(len(s.train_rows) for s in self.shards)

    @property
    def num_rows(self) -> int:
        return sum(len(s.image_ids) for s in self.shards)


@dataclass(frozen=True)
class Position:
    """Where a run is in its data: `epoch` epochs completed, `step` steps taken in the next one."""

    epoch: int = 0
    step: int = 0

    def rescaled(self, old_steps: int, new_steps: int) -> Position:
        """The same position for a group with another number of steps per epoch (an elastic restart): the same
        share of the epoch's rows taken, rounded down."""
        if old_steps == new_steps:
            return self
        return Position(self.epoch, min(self.step * new_steps // max(1, old_steps), new_steps))


@dataclass(frozen=True)
class Chunk:
    """One decode task's rows: `pieces` (shard path, row indices in that shard, in the order they are emitted)."""

    epoch: int
    pieces: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def num_rows(self) -> int:
        return sum(len(rows) for _, rows in self.pieces)


def augment_key(seed: int, epoch: int, image_id: int) -> tuple[int, int, int]:
    """The seed of one image's scale/flip draw in one epoch (`numpy.random.default_rng(augment_key(...))`)."""
    return (seed, epoch, image_id)


def _part(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of part `rank` when `n` items are cut into `world` contiguous parts, the first n % world longer."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (1 if rank < extra else 0)


def _pieces(rows: Sequence[tuple[int, int]], index: ShardIndex) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(shard, row) pairs → consecutive runs of one shard as (path, rows), keeping their order."""
    pieces: list[tuple[str, list[int]]] = []
    for shard, row in rows:
        path = index.shards[shard].path
        if pieces and pieces[-1][0] == path:
            pieces[-1][1].append(row)
        else:
            pieces.append((path, [row]))
    return tuple((path, tuple(r)) for path, r in pieces)


@dataclass(frozen=True)
class TrainPlan:
    """The train rows of a run: every epoch's order, each rank's part, its chunks (see the module docstring)."""

    index: ShardIndex
    seed: int
    batch: int  # images per rank and step
    shuffle: bool = True

    @classmethod
    def for_run(cls, index: ShardIndex, cfg: Any) -> TrainPlan:
        """The plan of a run config (`pipelines.config.Config`): its seed, per-worker batch and data.shuffle."""
        return cls(index, cfg.train.seed, cfg.per_worker_batch, cfg.data.shuffle)

    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps in one epoch with `world` ranks: every rank takes this many batches of its part."""
        return (self.index.num_train_rows // world) // self.batch

    def epochs(self, max_steps: int, world: int) -> int:
        """Epochs a run of `max_steps` steps trains with `world` ranks (the last one may be partial)."""
        return -(-max_steps // max(1, self.steps_per_epoch(world)))

    def epoch_rows(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, row) of every usable train row, in this epoch's order."""
        order = range(len(self.index.shards))
        if self.shuffle:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.index.shards)).tolist()
        return [(s, row) for s in order for row in self.index.shards[s].train_rows]

    def rank_rows(self, epoch: int, rank: int, world: int) -> list[tuple[int, int]]:
        """The rows rank `rank` trains on in `epoch`, in order: its part, chunk by chunk permuted, cut to
        steps_per_epoch batches."""
        rows = self.epoch_rows(epoch)
        start, end = _part(len(rows), rank, world)
        part = rows[start:end][: self.steps_per_epoch(world) * self.batch]
        out: list[tuple[int, int]] = []
        for k in range(0, len(part), CHUNK_ROWS):
            chunk = part[k : k + CHUNK_ROWS]
            if self.shuffle:
                chunk = [chunk[i] for i in np.random.default_rng((self.seed, epoch, rank, k)).permutation(len(chunk))]
            out.extend(chunk)
        return out

    def chunks(self, rank: int, world: int, start: Position, steps: int) -> Iterator[Chunk]:
        """Rank `rank`'s decode tasks for `steps` optimizer steps from `start`, in order; each chunk holds whole
        batches except where the run starts mid-chunk or ends."""
        per_epoch = self.steps_per_epoch(world)
        if per_epoch < 1:
            raise ValueError(
                f"{self.index.num_train_rows} usable train images are fewer than one batch of {self.batch} per rank "
                f"for {world} ranks"
            )
        epoch, skip, left = start.epoch, start.step * self.batch, steps * self.batch
        while left > 0:
            rows = self.rank_rows(epoch, rank, world)
            # chunk boundaries stay where an uninterrupted run has them (the permutation is keyed by the chunk)
            for k in range((skip // CHUNK_ROWS) * CHUNK_ROWS, len(rows), CHUNK_ROWS):
                take = rows[max(k, skip) : k + CHUNK_ROWS][:left]
                if not take:
                    break
                left -= len(take)
                yield Chunk(epoch, _pieces(take, self.index))
                if left == 0:
                    return
            epoch, skip = epoch + 1, 0


def val_chunks(index: ShardIndex, rank: int, world: int, batch: int) -> list[Chunk]:
    """Rank `rank`'s part of the val split (every row, contiguous parts in index order), in chunks of whole
    batches: every evaluation with the same group sees the same batches."""
    rows = [(s, row) for s, shard in enumerate(index.shards) for row in range(len(shard.image_ids))]
    start, end = _part(len(rows), rank, world)
    part = rows[start:end]
    size = max(batch, (CHUNK_ROWS // batch) * batch)  # whole batches per task: the same padding every time
    return [Chunk(0, _pieces(part[k : k + size], index)) for k in range(0, len(part), size)]
