"""The registered detector as an MLflow pyfunc model (models-from-code): what ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` run.

pipelines/tracking/model_logging.py logs this file as the model's code (``python_model=`` its path): MLflow copies it
into the model and executes it when the model is loaded, so nothing is unpickled (it loads with
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false). It may import only what travels with the model: the `retina` package
(``code_paths``), mlflow, pandas, numpy, torch and PIL; not `pipelines` or `cluster`.

- `load_context` rebuilds the RetinaNet from the model's one artifact, a weights-only bundle (weights.pt, config.json,
  label_map.json: `retina.inference.bundle`).
- `predict` takes a DataFrame with a binary column ``image`` (encoded JPEG/PNG/... bytes, one image per row; the
  scoring server base64-decodes it) and returns one row per input row, in input order: ``boxes`` ((N, 4) float32
  x1, y1, x2, y2 in the image's pixels), ``scores`` ((N,) float32, descending), ``labels`` ((N,) int64, 0..K-1),
  ``category_ids`` ((N,) int64 COCO ids), ``names`` (N str) and ``error`` ("" for a decoded image): what
  `Detector.predict` returns per image, which the scoring server writes as JSON arrays. It runs the prediction core
  of `retina.inference` (the same steps as `pipelines.inference.load_model(...).predict`), 8 images per forward
  pass; a row that failed takes no place in a batch.
- Bad rows: a value that is not a readable image (truncated, not an image, empty, not bytes) gets empty detections
  and its ``error`` ("row 3: cannot decode image: ..."), and the other rows are still answered. When no row is
  readable, `predict` raises MlflowException(INVALID_PARAMETER_VALUE), which the scoring server answers with
  HTTP 400 and the message naming every row.
"""

from __future__ import annotations

import io
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, Schema
from PIL import Image

from retina.inference.bundle import read_bundle
from retina.inference.images import Prepared, prepare_encoded
from retina.inference.predictor import Detections, Predictor

IMAGE_COLUMN = "image"  # the input: encoded image bytes
OUTPUT_COLUMNS = ("boxes", "scores", "labels", "category_ids", "names", "error")
MAX_ERRORS_NAMED = 20  # rows named in an all-rows-failed message; the rest are counted


def signature() -> ModelSignature:
    """The call as MLflow records it, batch first: a binary column of encoded images in, one row of detections per
    image out (lists of N per image; ``error`` is "" for an image that was decoded)."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([
            ColSpec(Array(Array("float")), "boxes"),  # N x [x1, y1, x2, y2]
            ColSpec(Array("float"), "scores"),
            ColSpec(Array("long"), "labels"),
            ColSpec(Array("long"), "category_ids"),
            ColSpec(Array("string"), "names"),
            ColSpec("string", "error"),
        ]),
    )  # fmt: skip


def input_example() -> pd.DataFrame:
    """One row holding a 24 x 16 mid-grey JPEG's bytes: the form of a request, not a photo (any size works)."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (114, 114, 114)).save(buf, format="JPEG")
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()]})


class RetinaNetModel(mlflow.pyfunc.PythonModel):
    """Encoded images → detections per image (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        artifacts = list(context.artifacts.values())
        if len(artifacts) != 1:  # the logger gives one: the bundle folder
            raise MlflowException(f"expected one artifact (the model bundle), got {sorted(context.artifacts)}")
        bundle = read_bundle(artifacts[0])
        self.predictor = Predictor(bundle.model, bundle.label_map)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns:
            raise MlflowException(
                f"expected a column {IMAGE_COLUMN!r} of encoded images, got {list(model_input.columns)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        items, errors = self._prepare(model_input[IMAGE_COLUMN].tolist())
        failed = [e for e in errors if e]
        if items and len(failed) == len(items):
            more = f"; and {len(failed) - MAX_ERRORS_NAMED} more" if len(failed) > MAX_ERRORS_NAMED else ""
            raise MlflowException(
                f"no image could be decoded: {'; '.join(failed[:MAX_ERRORS_NAMED])}{more}",
                error_code=INVALID_PARAMETER_VALUE,  # the scoring server's HTTP 400
            )
        rows = [_row(det, error) for det, error in zip(self.predictor.predict(items), errors, strict=True)]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS), index=model_input.index)

    def _prepare(self, values: list[Any]) -> tuple[list[Prepared | None], list[str]]:
        """Per value: the decoded, resized image and "", or None and its error ("row i: ...")."""
        items: list[Prepared | None] = []
        errors: list[str] = []
        for i, value in enumerate(values):
            name = f"row {i}"
            try:
                if not isinstance(value, (bytes, bytearray)):
                    raise TypeError(f"{name}: expected encoded image bytes, got {type(value).__name__}")
                items.append(prepare_encoded(bytes(value), name, self.predictor.cfg.input))
                errors.append("")
            except (ValueError, TypeError) as exc:  # ImageDecodeError is a ValueError; its message names the row
                items.append(None)
                errors.append(str(exc))
        return items, errors


def _row(det: Detections | None, error: str) -> dict[str, Any]:
    # The core's numpy arrays as they are (float32 boxes and scores, int64 ids: what the signature says); the scoring
    # server writes them as JSON arrays.
    if det is None:
        det = {
            "boxes": np.zeros((0, 4), np.float32),  # (0, 4): no detections for an image that was not decoded
            "scores": np.zeros((0,), np.float32),
            "labels": np.zeros((0,), np.int64),
            "category_ids": np.zeros((0,), np.int64),
            "names": [],
        }
    return {**det, "error": error}


mlflow.models.set_model(RetinaNetModel())
