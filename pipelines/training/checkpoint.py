"""Training checkpoints: one ``state.pt`` that loads with ``torch.load(weights_only=True)``.

Contents: model / optimizer / scheduler / GradScaler state dicts, step, the place in the data (epochs completed,
steps into the next, the world size), the run config, the label map and the metrics (a ``metrics.json`` beside
it, when present, holds those of an evaluation scored after the write). The config and label map are stored as
JSON text (plain strings), never as pickled objects, so a checkpoint from an untrusted place cannot run code when
it is loaded (weights_only refuses anything but tensors and containers).

A checkpoint is never written with non-finite weights: `save_checkpoint` checks every floating tensor first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retina.model import RetinaNet

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"  # the metrics of an evaluation scored after its checkpoint was written (background)
FORMAT = "retina-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format or would hold non-finite weights."""


@dataclass
class TrainState:
    step: int  # optimizer steps done
    epoch: int  # epochs completed
    config: dict[str, Any]
    label_map: list[dict[str, Any]]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    epoch_step: int = 0  # steps taken in the epoch after `epoch` (where the data continues)
    world: int = 0  # ranks of the group that took them (0: not recorded); another world size rescales epoch_step


def _non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(directory: str | os.PathLike, state: TrainState) -> Path:
    """Write ``state.pt`` into `directory` (created) and return its path."""
    bad = _non_finite(state.model)
    if bad:
        raise CheckpointError(f"refusing to write a checkpoint at step {state.step}: non-finite weights in {bad[:5]}")
    payload = {
        "format": FORMAT,
        "step": int(state.step),
        "epoch": int(state.epoch),
        "epoch_step": int(state.epoch_step),
        "world": int(state.world),
        "config_json": json.dumps(state.config, sort_keys=True),
        "label_map_json": json.dumps(state.label_map),
        "metrics_json": json.dumps(state.metrics or {}, sort_keys=True),
        "model": state.model,
        "optimizer": state.optimizer,
        "scheduler": state.scheduler,
        "scaler": state.scaler,
    }
    path = Path(directory) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def write_metrics(directory: str | os.PathLike, metrics: dict[str, float]) -> None:
    """Record the metrics of a checkpoint written before they were known (they replace state.pt's on load)."""
    (Path(directory) / METRICS_FILE).write_text(json.dumps(metrics, sort_keys=True))


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TrainState:
    """Read ``state.pt`` from a local checkpoint directory with weights_only=True; errors name the path."""
    path = Path(directory) / STATE_FILE
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint state file") from None
    except Exception as exc:  # truncated/corrupt file or a pickle with code in it
        raise CheckpointError(f"{path}: cannot load checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    return TrainState(
        step=payload["step"],
        epoch=payload["epoch"],
        epoch_step=payload.get("epoch_step", 0),  # absent from checkpoints written before it was recorded
        world=payload.get("world", 0),
        config=json.loads(payload["config_json"]),
        label_map=json.loads(payload["label_map_json"]),
        metrics=_metrics(Path(directory), payload["metrics_json"]),
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        scaler=payload["scaler"],
    )


def _metrics(directory: Path, in_state: str) -> dict[str, float]:
    sidecar = directory / METRICS_FILE
    try:
        return json.loads(sidecar.read_text()) if sidecar.exists() else json.loads(in_state)
    except ValueError as exc:
        raise CheckpointError(f"{sidecar}: malformed metrics: {exc}") from None


def model_from_state(state: TrainState) -> RetinaNet:
    """The trained detector of a checkpoint, rebuilt from the checkpoint's own config: the one checkpoint → model
    path (training's registration, the search's, inference). Errors name what does not fit."""
    from retina.inference.bundle import model_from_config

    try:
        return model_from_config(state.config, state.model)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint at step {state.step}: weights do not fit its config: {exc}") from None
