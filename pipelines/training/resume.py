"""Which checkpoint a (re)started worker group resumes from: Ray's latest, or the newest complete one before it.

Ray Train registers a checkpoint only after its upload finished, so a half-uploaded one is never the latest. A
checkpoint can still be damaged afterwards: a disk that filled, a copy cut short, an object overwritten in S3. A
run must not die on it while an older complete checkpoint sits beside it, so `load_latest` tries Ray's latest
first, then the other checkpoints of the run, newest first, and warns naming the one it skipped and the one it
took. Only when none loads does the error (naming the latest) stand.

Ray names a run's checkpoint folders ``checkpoint_<date>_<time>.<microseconds>`` beside each other in the run's
folder (local or S3), so their names sort in the order they were written (checked against Ray 2.60). A name that
does not follow that pattern is never considered.
"""

from __future__ import annotations

import logging
import posixpath
import re

import pyarrow.fs
import ray.train

from pipelines.training.checkpoint import CheckpointError, TrainState, load_checkpoint

logger = logging.getLogger(__name__)

# Ray's default checkpoint folder name: checkpoint_2026-12-05_20-50-12.123456
CHECKPOINT_DIR = re.compile(r"^checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}$")


def load_latest(checkpoint: ray.train.Checkpoint) -> tuple[TrainState, ray.train.Checkpoint]:
    """The state of `checkpoint` (Ray's latest) or, where it cannot be loaded, of the newest older checkpoint of
    the same run that can; with that checkpoint. Raises the latest's `CheckpointError` when none loads."""
    try:
        return _load(checkpoint), checkpoint
    except CheckpointError as exc:
        latest_error = exc
    for older in _older_checkpoints(checkpoint):
        try:
            state = _load(older)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s too: %s", older.path, exc)
            continue
        logger.warning("the latest checkpoint cannot be loaded (%s); resuming from the previous complete one, %s "
                       "(step %d)", latest_error, older.path, state.step)  # fmt: skip
        return state, older
    raise latest_error


def _load(checkpoint: ray.train.Checkpoint) -> TrainState:
    try:
        with checkpoint.as_directory() as directory:
            return load_checkpoint(directory)
    except CheckpointError:
        raise
    except Exception as exc:  # the download itself failed (an object gone from S3, a folder removed)
        raise CheckpointError(f"{checkpoint.path}: cannot read checkpoint: {type(exc).__name__}: {exc}") from exc


def _older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's other checkpoint folders written before `checkpoint`, newest first."""
    own = posixpath.basename(checkpoint.path.rstrip("/"))
    parent = posixpath.dirname(checkpoint.path.rstrip("/"))
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError as exc:
        logger.warning("cannot list the checkpoints in %s: %s", parent, exc)
        return []
    names = sorted(
        (i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and CHECKPOINT_DIR.match(i.base_name)),
        reverse=True,
    )
    return [
        ray.train.Checkpoint(posixpath.join(parent, name), filesystem=checkpoint.filesystem)
        for name in names
        if name < own
    ]
