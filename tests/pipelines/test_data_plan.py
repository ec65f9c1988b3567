"""The data plan (`pipelines.data.plan`): which rows each rank reads, in which order, as a pure function of the
shards, the seed and the group; exact resume; elastic rescaling. No Ray: hand-made shard indexes."""

from __future__ import annotations

from collections import Counter

import pytest

from pipelines.data.plan import CHUNK_ROWS, Position, Shard, ShardIndex, TrainPlan, augment_key, val_chunks


def _index(sizes: list[int], crowd_only: set[int] = frozenset()) -> ShardIndex:
    """Shards of `sizes` rows with consecutive image ids; `crowd_only` image ids are left out of training."""
    shards, next_id = [], 0
    for k, n in enumerate(sizes):
        ids = tuple(range(next_id, next_id + n))
        next_id += n
        shards.append(Shard(f"/s/{k:02d}.parquet", ids, tuple(i for i, img in enumerate(ids) if img not in crowd_only)))
    return ShardIndex.of(list(reversed(shards)))  # listed in another order: the index orders by first image id


def _ids(plan: TrainPlan, rows: list[tuple[int, int]]) -> list[int]:
    return [plan.index.shards[s].image_ids[r] for s, r in rows]


def _stream(plan: TrainPlan, rank: int, world: int, start: Position, steps: int) -> list[int]:
    """The image ids rank `rank` reads, in order (what its Dataset emits)."""
    by_path = {s.path: s for s in plan.index.shards}
    return [by_path[path].image_ids[r] for c in plan.chunks(rank, world, start, steps) for path, rows in c.pieces
            for r in rows]  # fmt: skip


def test_index_orders_shards_by_first_image_id_and_counts_usable_rows():
    index = _index([5, 3, 4], crowd_only={1, 6})
    assert [s.image_ids[0] for s in index.shards] == [0, 5, 8]
    assert index.num_rows == 12 and index.num_train_rows == 10


def test_an_epoch_is_every_usable_row_once_in_a_new_order_each_epoch():
    plan = TrainPlan(_index([7] * 6, crowd_only={3}), seed=1, batch=2)
    epochs = [_ids(plan, plan.epoch_rows(e)) for e in range(3)]
    for ids in epochs:
        assert sorted(ids) == [i for i in range(42) if i != 3]
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == _ids(plan, TrainPlan(plan.index, seed=1, batch=2).epoch_rows(0))  # same seed, same order
    assert epochs[0] != _ids(plan, TrainPlan(plan.index, seed=2, batch=2).epoch_rows(0))
    fixed = TrainPlan(plan.index, seed=1, batch=2, shuffle=False)
    assert _ids(fixed, fixed.epoch_rows(0)) == _ids(fixed, fixed.epoch_rows(5)) == [i for i in range(42) if i != 3]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_read_disjoint_equal_parts_of_whole_batches(world):
    plan = TrainPlan(_index([64, 64, 40, 17]), seed=0, batch=4)
    per_epoch = plan.steps_per_epoch(world)
    assert per_epoch == (185 // world) // 4
    parts = [_ids(plan, plan.rank_rows(0, r, world)) for r in range(world)]
    assert all(len(p) == per_epoch * 4 for p in parts)  # every rank steps the same number of times
    seen = Counter(i for p in parts for i in p)
    assert max(seen.values()) == 1  # no row read by two ranks


def test_chunks_cover_exactly_the_steps_asked_for_across_epochs():
    plan = TrainPlan(_index([30, 30, 30]), seed=3, batch=4)
    per_epoch = plan.steps_per_epoch(2)  # 11
    stream = _stream(plan, 0, 2, Position(), 2 * per_epoch + 3)
    assert len(stream) == (2 * per_epoch + 3) * 4
    assert stream[: per_epoch * 4] == _ids(plan, plan.rank_rows(0, 0, 2))
    assert stream[per_epoch * 4 : 2 * per_epoch * 4] == _ids(plan, plan.rank_rows(1, 0, 2))
    assert all(c.num_rows <= CHUNK_ROWS for c in plan.chunks(0, 2, Position(), 40))


def test_resume_continues_at_the_exact_row_mid_chunk():
    plan = TrainPlan(_index([100, 100, 100]), seed=5, batch=3)
    whole = _stream(plan, 1, 2, Position(), 120)
    per_epoch = plan.steps_per_epoch(2)
    for steps_done in (1, 21, per_epoch, per_epoch + 7):
        start = Position(steps_done // per_epoch, steps_done % per_epoch)
        assert _stream(plan, 1, 2, start, 120 - steps_done) == whole[steps_done * 3 :]


def test_an_elastic_restart_continues_the_epoch_at_the_same_share():
    assert Position(2, 10).rescaled(old_steps=40, new_steps=80) == Position(2, 20)
    assert Position(2, 39).rescaled(old_steps=40, new_steps=20) == Position(2, 19)
    assert Position(1, 5).rescaled(old_steps=40, new_steps=40) == Position(1, 5)


def test_augmentation_is_keyed_by_seed_epoch_and_image():
    assert augment_key(0, 3, 17) == augment_key(0, 3, 17) != augment_key(0, 4, 17)


def test_too_few_rows_for_one_batch_per_rank_is_a_clear_error():
    plan = TrainPlan(_index([5]), seed=0, batch=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        list(plan.chunks(0, 2, Position(), 1))


def test_val_parts_cover_every_row_once_in_whole_batches():
    index = _index([10, 10, 5], crowd_only={2})  # evaluation keeps crowd-only images
    parts = [val_chunks(index, r, 2, batch=4) for r in range(2)]
    ids = [index.shards[[s.path for s in index.shards].index(p)].image_ids[r] for part in parts for c in part
           for p, rows in c.pieces for r in rows]  # fmt: skip
    assert sorted(ids) == list(range(25))
    assert all(c.num_rows % 4 == 0 for part in parts for c in part[:-1])  # the same batches every evaluation
    assert parts == [val_chunks(index, r, 2, batch=4) for r in range(2)]
