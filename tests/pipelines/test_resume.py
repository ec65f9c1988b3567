"""A damaged latest checkpoint: the restart resumes from the previous complete one, with a warning naming both."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs
import pytest
import ray.train
import torch

from cluster import s3
from pipelines.training.checkpoint import STATE_FILE, CheckpointError, TrainState, save_checkpoint
from pipelines.training.resume import load_latest
from tests.s3_server import s3_server  # noqa: F401  (session fixture, found by name)

# Ray's folder names (timestamps: they sort in the order written); "notes" is no checkpoint and is never tried.
NAMES = ["checkpoint_2026-12-05_10-00-00.000001", "checkpoint_2026-12-05_10-05-00.000002",
         "checkpoint_2026-12-05_10-10-00.000003"]  # fmt: skip


def _state(step: int) -> TrainState:
    return TrainState(step=step, epoch=step // 10, epoch_step=step % 10, world=2, config={"x": 1}, label_map=[],
                      model={"w": torch.full((4,), float(step))})  # fmt: skip


def _write_run(run: Path) -> list[Path]:
    dirs = []
    for i, name in enumerate(NAMES):
        dirs.append(run / name)
        save_checkpoint(dirs[-1], _state(10 * (i + 1)))
    (run / "notes").mkdir()
    return dirs


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_intact_latest_checkpoint_is_used(tmp_path):
    dirs = _write_run(tmp_path)
    state, used = load_latest(ray.train.Checkpoint(str(dirs[-1])))
    assert state.step == 30 and used.path == str(dirs[-1])


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    dirs = _write_run(tmp_path)
    _truncate(dirs[2] / STATE_FILE)
    (dirs[1] / STATE_FILE).unlink()  # the one before is gone too: the next older is taken
    with caplog.at_level(logging.WARNING, logger="pipelines.training.resume"):
        state, used = load_latest(ray.train.Checkpoint(str(dirs[2])))
    assert state.step == 10 and used.path == str(dirs[0])
    assert torch.equal(state.model["w"], torch.full((4,), 10.0))
    warning = caplog.text
    assert str(dirs[2] / STATE_FILE) in warning and str(dirs[0]) in warning and "step 10" in warning
    assert str(dirs[1]) in warning  # the skipped one is named as well


def test_no_loadable_checkpoint_raises_the_latest_error(tmp_path):
    dirs = _write_run(tmp_path)
    for d in dirs:
        _truncate(d / STATE_FILE)
    with pytest.raises(CheckpointError, match=f"{dirs[2] / STATE_FILE}: cannot load checkpoint"):
        load_latest(ray.train.Checkpoint(str(dirs[2])))


def test_newer_checkpoints_are_never_taken(tmp_path):
    dirs = _write_run(tmp_path)
    _truncate(dirs[1] / STATE_FILE)
    state, used = load_latest(ray.train.Checkpoint(str(dirs[1])))  # the latest Ray knows is the middle one
    assert state.step == 10 and used.path == str(dirs[0])


@pytest.mark.slow
def test_a_truncated_checkpoint_in_s3_falls_back(s3_server, tmp_path, caplog):  # noqa: F811
    dirs = _write_run(tmp_path / "run")
    bucket = s3_server.new_bucket()
    name = s3.split_s3(bucket)[0]
    client = s3_server.client()
    for d in dirs:
        data = (d / STATE_FILE).read_bytes()
        body = data[: len(data) // 2] if d == dirs[-1] else data  # the latest truncated in S3
        client.put_object(Bucket=name, Key=f"run/{d.name}/{STATE_FILE}", Body=body)
    fs, inner = s3.arrow_filesystem(f"{bucket}/run")
    assert isinstance(fs, pyarrow.fs.FileSystem)
    latest = ray.train.Checkpoint(f"{inner}/{NAMES[-1]}", filesystem=fs)
    with caplog.at_level(logging.WARNING, logger="pipelines.training.resume"):
        state, used = load_latest(latest)
    assert state.step == 20 and used.path == f"{inner}/{NAMES[1]}"
    assert NAMES[-1] in caplog.text and NAMES[1] in caplog.text
