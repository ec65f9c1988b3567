"""``model.init_from`` in the worker loop: read the source it names and start the model from it
(`retina.init_from.initialise`: the weights, and the class output row by row by class name).

Sources and where their class names come from:
- an MLflow model this project registered (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``)
  in the run's tracking store: its weights-only bundle and the label map it carries;
- a training checkpoint (a folder holding ``state.pt`` or that file, local or s3://): its run's label map;
- any other file: a torchvision RetinaNet state dict, labelled with COCO's category names.

The first two load as `pipelines.inference.loading` loads a model for prediction (no pickle). Every rank reads the
source itself, so every rank starts from the same weights before DDP's first step; a run that resumes from its own
checkpoint never gets here (`pipelines.training.loop.train_func`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from retina.data.coco import LabelMap
from retina.init_from import KEY, InitReport, InitSource, initialise, torchvision_source
from retina.model import RetinaNet
from retina.typed_config import ConfigError

if TYPE_CHECKING:
    from pipelines.training.loop import RunInputs

logger = logging.getLogger("retina.train")

# The MLflow tag that records what a fresh run started from (its value: `InitReport.summary`).
INIT_FROM_TAG = "retina.init_from"


def read_source(uri: str, tracking_uri: str) -> InitSource:
    """The weights and class names `uri` names; ConfigError naming ``model.init_from`` when it cannot be read."""
    from cluster import s3
    from pipelines.data.shards import settings_for
    from pipelines.inference.loading import ModelLoadError, load_source, resolve_model
    from pipelines.training.checkpoint import STATE_FILE

    path = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and not s3.is_s3(uri) and path.is_file() and path.name != STATE_FILE:
        return torchvision_source(path)
    try:
        source = resolve_model(uri, tracking_uri)
        bundle = load_source(source, settings_for(uri))
    except ModelLoadError as exc:
        raise ConfigError(f"{KEY}: {exc}") from None
    what = "checkpoint" if source.kind == "checkpoint" else "MLflow model"
    return InitSource(f"{what} {source.describe()}", bundle.model.state_dict(), bundle.label_map.names,
                      bundle.model.cfg)  # fmt: skip


def start_from(model: RetinaNet, inputs: RunInputs, rank: int) -> InitReport | None:
    """Start a fresh run's `model` from ``model.init_from`` (None when it is empty); rank 0 logs what it did."""
    uri = inputs.config.model.init_from
    if not uri:
        return None
    report = initialise(model, read_source(uri, inputs.tracking_uri), LabelMap.from_json(inputs.label_map).names)
    if rank == 0:
        logger.info("%s: %s", KEY, report.summary())
    return report
