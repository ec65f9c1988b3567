"""A trained detector as three plain files in one folder, and back, without pickle.

    weights.pt       the state dict alone: tensors only, read with ``torch.load(weights_only=True)``
    config.json      the training run's config; its ``model`` section rebuilds the network with this code
    label_map.json   [{"id", "name", "label"}]: contiguous label → COCO category id and class name

A folder like this is what the MLflow model carries (pipelines/tracking/model_logging.py logs it as the pyfunc
model's artifact; models of the earlier format keep the same three files under ``extra_files/``). Reading it runs
no pickle, so a model from an untrusted place cannot run code when it is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retina.config import ModelConfig
from retina.data.coco import LabelMap
from retina.model import RetinaNet, build_retinanet
from retina.typed_config import config_from_dict

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
LABEL_MAP_FILE = "label_map.json"
FILES = (WEIGHTS_FILE, CONFIG_FILE, LABEL_MAP_FILE)


class BundleError(ValueError):
    """The folder is not a readable model bundle, or its weights do not fit its config; the message names it."""


@dataclass
class Bundle:
    model: RetinaNet  # eval mode, on CPU
    label_map: LabelMap
    config: dict[str, Any]  # the training run's config (data.val_batch_size ... for evaluate.py)


def is_bundle(directory: str | os.PathLike) -> bool:
    return all((Path(directory) / name).is_file() for name in FILES)


def write_bundle(
    directory: str | os.PathLike, model: RetinaNet, config: dict[str, Any], label_map: list[dict[str, Any]]
) -> Path:
    """Write the three files into `directory` (created); returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # tensors only, CPU: loads anywhere
    torch.save(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    (out / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=1))
    return out


def model_from_config(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> RetinaNet:
    """The run config's ``model`` section → a RetinaNet of this code with `state_dict` loaded (eval mode): the one
    config + weights → model path (model bundles, and checkpoints through `pipelines.training.checkpoint`)."""
    model_cfg = config_from_dict(config.get("model", {}), cls=ModelConfig)
    # The weights come from the state dict: never read the backbone's ImageNet file (it may not exist here).
    model_cfg = dataclasses.replace(model_cfg, backbone=dataclasses.replace(model_cfg.backbone, weights=None))
    model = build_retinanet(model_cfg)
    model.load_state_dict(state_dict)
    return model.eval()


def read_bundle(directory: str | os.PathLike) -> Bundle:
    """The detector in `directory`, rebuilt from its config with its weights loaded weights-only."""
    where = Path(directory)
    missing = [name for name in FILES if not (where / name).is_file()]
    if missing:
        raise BundleError(f"{where}: not a model bundle (missing {', '.join(missing)})")
    try:
        config = json.loads((where / CONFIG_FILE).read_text())
        label_map = LabelMap.from_json(json.loads((where / LABEL_MAP_FILE).read_text()))
        state = torch.load(where / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model = model_from_config(config, state)
    except Exception as exc:  # unreadable JSON, a pickle with code in it, a config error, weights of another shape
        raise BundleError(f"{where}: cannot rebuild the model: {type(exc).__name__}: {exc}") from None
    if model.cfg.num_classes != label_map.num_classes:
        raise BundleError(
            f"{where}: the model has {model.cfg.num_classes} classes but its label map {label_map.num_classes}"
        )
    return Bundle(model, label_map, config)
