"""Log the trained detector to MLflow as a pyfunc model, register it, let the alias rule decide where the alias
points.

The logged model is MLflow's models-from-code: its code is pipelines/inference/pyfunc_model.py (a `PythonModel`
that MLflow executes when the model is loaded), its one artifact a weights-only bundle (`retina.inference.bundle`:
``weights.pt``, a state dict, with ``config.json`` and ``label_map.json``), and the `retina` package travels with it
(``code_paths``). Nothing is pickled, so every way of loading it runs no pickle:

- ``mlflow.pyfunc.load_model(uri).predict(df)`` and ``mlflow models serve -m uri``: a DataFrame with a binary
  column ``image`` (encoded images) in, one row of detections per image out (the signature and input example say
  so, batch first; MLflow runs the example through the serving path when the model is logged);
- `pipelines.inference.load_model(uri)`: the same bundle rebuilt into a `Detector` (file paths, arrays, PIL images).

Both run the prediction core of `retina.inference`, so they return the same detections for the same batches.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy
import pandas
import PIL
import torch
import torchvision
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils import logging_utils

import retina
from pipelines import names
from pipelines.inference.pyfunc_model import input_example, signature
from pipelines.tracking.alias import ChampionDecision, promote_if_better
from retina.inference.bundle import write_bundle
from retina.model import RetinaNet

# The model's code file, by path: MLflow copies it into the model and executes it when the model is loaded.
PYFUNC_MODEL_FILE = importlib.util.find_spec("pipelines.inference.pyfunc_model").origin
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class LoggedModel:
    model_uri: str  # the logged model itself (models:/<model_id>)
    registered_name: str
    version: str
    champion: ChampionDecision | None  # what the alias rule decided (None: no tracking.alias)

    @property
    def alias(self) -> str | None:
        """The alias now pointing at this version (None: it did not take it)."""
        return self.champion.alias if self.champion is not None and self.champion.moved else None

    @property
    def alias_uri(self) -> str | None:
        return f"models:/{self.registered_name}@{self.alias}" if self.alias else None


def _requirements() -> list[str]:
    # Explicit pins: MLflow's requirement inference would load the model in a subprocess (slow) to guess them. What
    # the travelling code imports: torch, torchvision, numpy, PIL (retina), pandas (the pyfunc's frames), pyyaml
    # (retina.typed_config), pycocotools (retina.evaluation, in the package though prediction never imports it).
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pandas.__version__}",
        f"pillow=={PIL.__version__}",
        f"pyyaml=={yaml.__version__}",
        "pycocotools",
    ]


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """MLflow's registration prints ("Successfully registered model", "Created version") and its progress bars (it
    copies the bundle, then reads the model back to check the input example) kept off the console: the training
    command prints the registered version itself."""
    printed = logging_utils.MLFLOW_LOGGING_STREAM  # eprint() writes there at call time, not through logging
    logging_utils.MLFLOW_LOGGING_STREAM = io.StringIO()
    bars = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"  # read at each download
    try:
        yield
    finally:
        logging_utils.MLFLOW_LOGGING_STREAM = printed
        if bars is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = bars


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
        "Every way of loading it rebuilds the detector from its weights-only state dict and config; nothing is "
        "unpickled (it loads with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`). `MLFLOW_TRACKING_URI` must point at "
        "this MLflow store.",
        "",
        f"- **pyfunc**: `mlflow.pyfunc.load_model('{uri}').predict(pandas.DataFrame({{'image': [jpeg_bytes, ...]}}))`"
        " → one row per image, in order: `boxes` (N × [x1, y1, x2, y2] in the image's pixels), `scores`, `labels` "
        "(0..K-1), `category_ids` (COCO ids), `names`, and `error` (\"\" when the image decoded). The signature and "
        "input example describe this call: a binary column `image`, batch first.",
        f"- **REST**: `mlflow models serve -m {uri} --env-manager local -h 127.0.0.1 -p 5001`, then `POST "
        '/invocations` with `{"dataframe_split": {"columns": ["image"], "data": [["<base64 JPEG>"], ...]}}` → '
        '`{"predictions": [{"boxes": ..., "scores": ..., ...}, ...]}`. A row that is not a readable image gets '
        "empty detections and its `error`; a request without any readable image is answered with HTTP 400 naming "
        "each row.",
        f"- **this repository**: `from pipelines.inference import load_model; detector = load_model('{uri}')`, then "
        "`detector.predict(['photo.jpg'])` (file paths, s3:// URIs, bytes, arrays, PIL images) → the same fields "
        "per image as numpy arrays; `pipelines/predict.py` and `pipelines/evaluate.py` take the same URI.",
        "",
        "Labels 0..K-1 map to COCO ids and names as:",
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
    """Log `model` (eval mode, on CPU) into run `run_id`, register a new version, and let the alias rule
    (`pipelines.tracking.alias`) decide whether `alias` moves to it; the decision is tagged on the run."""
    model = model.cpu().eval()
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        # the folder's name is the artifact's name inside the model (artifacts/<name>/), where load_model finds it
        bundle = write_bundle(Path(tmp) / names.MODEL_BUNDLE_ARTIFACT, model, config, label_map)
        # start_run on an existing id attaches (the run's final status is set by the caller afterwards).
        with mlflow.start_run(run_id=run_id), _quiet_logging():
            info = mlflow.pyfunc.log_model(
                name=names.MODEL_ARTIFACT_PATH,
                python_model=PYFUNC_MODEL_FILE,  # models-from-code: the file travels, not a pickled object
                artifacts={names.MODEL_BUNDLE_ARTIFACT: str(bundle)},
                code_paths=[str(Path(retina.__file__).parent)],
                pip_requirements=_requirements(),
                signature=signature(),
                input_example=input_example(),  # MLflow runs it through the serving path here: a failure would warn
                registered_model_name=registered_model_name,
                metadata={"val_AP": val_ap, "label_map": label_map},
            )
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    uri = f"models:/{registered_model_name}/{version}"
    client.update_model_version(registered_model_name, version, description=describe(config, label_map, val_ap, uri))
    client.set_model_version_tag(registered_model_name, version, names.VERSION_VAL_AP_TAG, f"{val_ap:.4f}")
    client.set_model_version_tag(registered_model_name, version, names.VERSION_RUN_ID_TAG, run_id)
    # the one alias rule (pipelines/tracking/alias.py): only a better model takes it
    champion = promote_if_better(client, registered_model_name, alias, version, val_ap, alias_min_ap) if alias else None
    if champion is not None:
        for key, value in champion.tags().items():
            client.set_tag(run_id, key, value)
    return LoggedModel(model_uri=info.model_uri, registered_name=registered_model_name, version=version,
                       champion=champion)  # fmt: skip
