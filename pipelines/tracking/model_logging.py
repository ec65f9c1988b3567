"""Log the trained detector to MLflow as a PyTorch model, register it and point an alias at the new version.

The logged object is the `retina.model.RetinaNet` itself: it carries its `ModelConfig` (``model.cfg``, input
resize and normalisation included), so ``mlflow.pytorch.load_model(uri)`` in a fresh process gives a detector
that takes a list of (3, H, W) 0..1 images and returns boxes in their pixels. The label map travels twice:
as ``model.label_map`` ([{"id", "name", "label"}], label → COCO category id) and as ``label_map.json`` beside
the weights. The `retina` package is copied in (``code_paths``), so loading needs torch/torchvision, not the repo.

Beside the pickled module travel the weights alone (``weights.pt``, a state dict) and ``config.json``:
`pipelines.inference.load_model` rebuilds the detector from those with ``weights_only=True``, so a team can load a
model without trusting a pickle.

The model's signature and input example describe that loading path: one RGB image in, as an (H, W, 3) uint8 array,
and per image ``boxes``, ``scores``, ``labels``, ``category_ids`` and ``names`` out (`Detector.predict`). MLflow's
generic pyfunc path cannot run this detector (the PyTorch flavor's wrapper feeds the model one tensor and expects one
tensor back, the detector takes a list of images and returns detections per image); the model's description says so.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import torchvision
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec
from mlflow.utils import logging_utils

import retina
from pipelines.names import LOGGED_WEIGHTS_FILE, VERSION_RUN_ID_TAG, VERSION_VAL_AP_TAG
from retina.model import RetinaNet


@dataclass
class LoggedModel:
    model_uri: str  # the logged model itself (models:/<model_id>)
    registered_name: str
    version: str
    alias: str | None  # set when val/AP reached tracking.alias_min_ap
    alias_uri: str | None  # models:/<name>@<alias>


def _requirements() -> list[str]:
    # Explicit pins: MLflow's requirement inference would load the model in a subprocess (slow) to guess them.
    import numpy
    import PIL
    import pycocotools  # noqa: F401  (retina.evaluation imports it)

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"pillow=={PIL.__version__}",
        "pycocotools",
        "pyyaml",
    ]


def signature() -> ModelSignature:
    """What `pipelines.inference`'s ``Detector.predict`` takes and returns per image, as MLflow records it: an RGB
    image (H, W, 3) uint8 → boxes (N, 4) x1, y1, x2, y2 in its pixels, scores (N,) descending, contiguous labels,
    COCO category ids and class names. (The outputs are what ``mlflow.models.infer_signature`` makes of a real
    detection; tests/pipelines/test_predict.py checks that they stay so.)"""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]),
        outputs=Schema([
            ColSpec(Array(Array("float")), "boxes"),
            ColSpec(Array("float"), "scores"),
            ColSpec(Array("long"), "labels"),
            ColSpec(Array("long"), "category_ids"),
            ColSpec(Array("string"), "names"),
        ]),
    )  # fmt: skip


def input_example() -> np.ndarray:
    """A small mid-grey RGB image, (16, 24, 3) uint8: the input's form (any size works; the model resizes it)."""
    return np.full((16, 24, 3), 114, dtype=np.uint8)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Where MLflow says something at logging time that is not for the user to act on:
_EXPECTED_NOTICES = {
    # the input example's serving check runs it through the pyfunc path, which cannot run this detector by design
    # (the description says so and points at `load_model`); the warning would read as a failure of the logging
    "mlflow.models.model": ("Failed to validate serving input example",),
    # the pickle flavor is a deliberate choice (see log_and_register) next to the weights-only files that
    # `load_model` uses; the warning recommends pt2, which cannot express detection outputs
    "mlflow.pytorch": ("Saving pytorch model by Pickle",),
}


@contextmanager
def _without_expected_notices() -> Iterator[None]:
    """MLflow's expected warnings filtered, and its registration prints ("Successfully registered model",
    "Created version") kept off the console: the training command prints the registered version itself."""
    filters = {name: _DropMessages(*prefixes) for name, prefixes in _EXPECTED_NOTICES.items()}
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    printed = logging_utils.MLFLOW_LOGGING_STREAM  # eprint() writes there at call time, not through logging
    logging_utils.MLFLOW_LOGGING_STREAM = io.StringIO()
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM = printed
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)


def describe(config: dict[str, Any], label_map: list[dict[str, Any]], val_ap: float, uri: str) -> str:
    """The model version's page in words (markdown): what it is, what it was trained on, how to load it, and what
    its labels mean."""
    m, d, t = config["model"], config["data"], config["train"]
    b = m["backbone"]
    classes = ", ".join(f"{c['label']} = {c['name']} (COCO id {c['id']})" for c in label_map[:20])
    more = f", ... ({len(label_map)} classes)" if len(label_map) > 20 else ""
    return "\n".join([
        f"**RetinaNet** ({b['name']}, width {b['width']}, FPN {b['fpn_channels']} channels, "
        f"{m['input']['min_size']} px) with the focal loss (γ {m['loss']['gamma']:g}, α {m['loss']['alpha']:g}, "
        f"prior π {m['head']['prior']:g}), trained for {t['max_steps']} steps on `{d['train_shards']}`; "
        f"val/AP {val_ap:.4f} on `{d['val_shards']}`.",
        "",
        "Load it (needs this repository's packages; the tracking URI must point at this MLflow store):",
        f"`from pipelines.inference import load_model; detector = load_model('{uri}')`, then "
        "`detector.predict(['photo.jpg'])` → per image `boxes` (x1, y1, x2, y2 pixels), `scores`, `labels`, "
        "`category_ids` (COCO ids) and `names`. It rebuilds the detector from `extra_files/weights.pt` and "
        "`config.json` without unpickling anything.",
        "",
        "The signature and input example describe that call for one image: in, an RGB image as an (H, W, 3) uint8 "
        "array (`predict` also takes file paths, PIL images and (3, H, W) 0..1 tensors); out, `boxes`, `scores`, "
        "`labels`, `category_ids` and `names`. MLflow's generic pyfunc path (`mlflow.pyfunc.load_model`, "
        "`mlflow models serve`) cannot run this detector: the PyTorch flavor's wrapper feeds the model one "
        "tensor and expects one tensor back, the detector takes a list of images and returns detections per image.",
        "",
        f"Or `mlflow.pytorch.load_model('{uri}')`: a pickled `retina.model.RetinaNet` (load it only from a "
        "registry you trust); it returns contiguous labels 0..K-1, which map to COCO ids and names through its "
        "`label_map` attribute and `extra_files/label_map.json`:",
        "",
        classes + more,
    ])  # fmt: skip


def log_and_register(
    model: RetinaNet,
    *,
    label_map: list[dict[str, Any]],
    config: dict[str, Any],
    tracking_uri: str,
    run_id: str,
    registered_model_name: str,
    alias: str,
    alias_min_ap: float,
    val_ap: float,
) -> LoggedModel:
    """Log `model` (eval mode, on CPU) into run `run_id`, register a new version, set the alias if earned."""
    model = model.cpu().eval()
    model.label_map = [dict(c) for c in label_map]  # plain data: survives pickling into the MLflow model
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        label_file = Path(tmp) / "label_map.json"
        label_file.write_text(json.dumps(label_map, indent=1))
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config, indent=1, sort_keys=True))
        # The weights alone (tensors only: they load with torch.load(weights_only=True)); with config.json they
        # rebuild the detector from this repository's code, so loading never has to unpickle model.pth.
        weights_file = Path(tmp) / LOGGED_WEIGHTS_FILE
        torch.save(model.state_dict(), weights_file)
        # start_run on an existing id attaches (the run's final status is set by the caller afterwards).
        with mlflow.start_run(run_id=run_id), _without_expected_notices():
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                # pickle, not MLflow 3's default pt2 (torch.export): detection output sizes depend on the data
                # (score threshold, NMS), which an exported static graph cannot express.
                serialization_format="pickle",
                code_paths=[str(Path(retina.__file__).parent)],
                extra_files=[str(label_file), str(config_file), str(weights_file)],
                pip_requirements=_requirements(),
                # given, not inferred: inferring runs the example through pyfunc, which cannot run the detector
                signature=signature(),
                input_example=input_example(),
                registered_model_name=registered_model_name,
                metadata={"val_AP": val_ap, "label_map": label_map},
            )
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    uri = f"models:/{registered_model_name}/{version}"
    client.update_model_version(registered_model_name, version, description=describe(config, label_map, val_ap, uri))
    client.set_model_version_tag(registered_model_name, version, VERSION_VAL_AP_TAG, f"{val_ap:.4f}")
    client.set_model_version_tag(registered_model_name, version, VERSION_RUN_ID_TAG, run_id)
    alias_set = bool(alias) and val_ap >= alias_min_ap
    if alias_set:
        # one call moves the alias: consumers of models:/<name>@<alias> never see it missing
        client.set_registered_model_alias(registered_model_name, alias, version)
    return LoggedModel(
        model_uri=info.model_uri,
        registered_name=registered_model_name,
        version=version,
        alias=alias if alias_set else None,
        alias_uri=f"models:/{registered_model_name}@{alias}" if alias_set else None,
    )
