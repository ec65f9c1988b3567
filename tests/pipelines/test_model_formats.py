"""`load_model` on models logged by earlier versions of this repository (the mlflow.pytorch flavor, a pickled module):
one that carries the weights-only files under extra_files/ loads from those, one with only the pickle is refused with
a message that says why. Real MLflow in an embedded SQLite store; no server, no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retina.config import ModelConfig
from retina.data.coco import LabelMap
from retina.inference import bundle
from retina.inference.images import prepare
from retina.inference.predictor import Predictor
from retina.model import build_retinanet

LABELS = [{"id": 3, "name": "cat", "label": 0}, {"id": 9, "name": "dog", "label": 1}]


def _tiny_model():
    """resnet10 at width 16, a 32-channel FPN, one conv per subnet, 128 px, score threshold 0: detections always."""
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name, cfg.backbone.width, cfg.backbone.norm = "resnet10", 16, "bn"
    cfg.backbone.trainable_layers, cfg.backbone.fpn_channels = 5, 32
    cfg.head.num_convs = 1
    cfg.input.min_size, cfg.input.max_size = 128, 160
    cfg.postprocess.score_thresh = 0.0
    torch.manual_seed(0)
    return build_retinanet(cfg).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import experiment_id

    root = tmp_path_factory.mktemp("formats")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    # the project's own experiment creation: its artifacts stay beside the database, in this temporary folder
    return root, uri, client.create_run(experiment_id(client, "formats")).info.run_id


def _log_pytorch_model(store, model, extra_files: list[str]) -> str:
    """The earlier format: mlflow.pytorch with the pickled module, plus `extra_files`; returns models:/<model_id>."""
    import mlflow
    import mlflow.pytorch

    _, uri, run_id = store
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        # requirements given: inferring them would load the model in a subprocess (seconds, nothing to test here)
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", extra_files=extra_files,
                                        pip_requirements=["torch"])  # fmt: skip
    return info.model_uri


def test_earlier_format_loads_from_its_weights_only_files(store):
    from pipelines.inference import load_model

    model = _tiny_model()
    files = bundle.write_bundle(store[0] / "bundle", model, {"model": dataclasses.asdict(model.cfg)}, LABELS)
    uri = _log_pytorch_model(store, model, [str(files / name) for name in bundle.FILES])
    detector = load_model(uri, tracking_uri=store[1], device="cpu")
    image = np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)  # (H, W, 3) uint8
    [want] = Predictor(model, LabelMap.from_json(LABELS), "cpu").predict([prepare(image, model.cfg.input)])
    [got] = detector.predict(image)
    assert len(want["scores"]) > 0
    np.testing.assert_array_equal(got["boxes"], want["boxes"])
    assert got["category_ids"].tolist() == want["category_ids"].tolist()


def test_pickle_only_model_is_refused_with_the_reason(store):
    from pipelines.inference import ModelLoadError, load_model

    uri = _log_pytorch_model(store, _tiny_model(), [])
    with pytest.raises(ModelLoadError, match="carries no weights-only bundle .* this loader runs no pickle"):
        load_model(uri, tracking_uri=store[1], device="cpu")
