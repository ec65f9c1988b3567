"""The prediction core (`retina.inference`) on a tiny random RetinaNet: the bundle round trip without pickle, bad
images named, and a failed image taking no place in a batch. Fast: no Ray, no MLflow."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from retina.config import ModelConfig
from retina.data.coco import LabelMap
from retina.data.transforms import ImageDecodeError
from retina.inference import bundle
from retina.inference.images import prepare, prepare_encoded, to_rgb_uint8
from retina.inference.predictor import Predictor
from retina.model import build_retinanet

LABELS = [{"id": 3, "name": "cat", "label": 0}, {"id": 7, "name": "dog", "label": 1}, {"id": 90, "name": "owl",
                                                                                      "label": 2}]  # fmt: skip


def _tiny_model(seed: int = 0):
    """resnet10 at width 16, a 32-channel FPN, one conv per subnet, 128 px, score threshold 0: detections always."""
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.name, cfg.backbone.width, cfg.backbone.norm = "resnet10", 16, "bn"
    cfg.backbone.trainable_layers, cfg.backbone.fpn_channels = 5, 32
    cfg.head.num_convs = 1
    cfg.anchors.sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
    cfg.input.min_size, cfg.input.max_size = 128, 192
    cfg.postprocess.score_thresh = 0.0
    torch.manual_seed(seed)
    return build_retinanet(cfg).eval()


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_bundle_round_trip_rebuilds_the_same_detector(tmp_path):
    model = _tiny_model()
    config = {"model": dataclasses.asdict(model.cfg), "data": {"val_batch_size": 4}}
    bundle.write_bundle(tmp_path, model, config, LABELS)
    assert bundle.is_bundle(tmp_path)
    loaded = bundle.read_bundle(tmp_path)
    assert loaded.config == json.loads(json.dumps(config)) and loaded.label_map == LabelMap.from_json(LABELS)
    image = [prepare(to_rgb_uint8(_jpeg(150, 100, 1)), model.cfg.input)]
    [want] = Predictor(model, loaded.label_map, "cpu").predict(image)
    [got] = Predictor(loaded.model, loaded.label_map, "cpu").predict(image)
    assert len(want["scores"]) > 0
    np.testing.assert_array_equal(got["boxes"], want["boxes"])
    assert set(got["category_ids"].tolist()) <= {3, 7, 90} and got["names"][0] in {"cat", "dog", "owl"}


class _Payload:  # not a tensor: torch.load(weights_only=True) must refuse to rebuild it
    pass


def test_bundle_refuses_weights_that_need_unpickling(tmp_path):
    model = _tiny_model()
    bundle.write_bundle(tmp_path, model, {"model": dataclasses.asdict(model.cfg)}, LABELS)
    torch.save({**model.state_dict(), "extra": _Payload()}, tmp_path / bundle.WEIGHTS_FILE)
    with pytest.raises(bundle.BundleError, match="cannot rebuild the model") as info:
        bundle.read_bundle(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / bundle.LABEL_MAP_FILE).unlink()
    with pytest.raises(bundle.BundleError, match="missing label_map.json"):
        bundle.read_bundle(tmp_path)


def test_bad_images_are_named():
    cfg = _tiny_model().cfg.input
    good = _jpeg(64, 48, 2)
    assert prepare_encoded(good, "row 0", cfg).orig_size == (48, 64)
    for data, problem in ((good[:200], "cannot decode image"), (b"plain text", "not an image"), (b"", "empty")):
        with pytest.raises(ImageDecodeError, match=f"^row 3: {problem}"):
            prepare_encoded(data, "row 3", cfg)


def test_a_failed_image_takes_no_place_in_a_batch():
    """None items come back None; the others get what a batch of only them gets (same padding), in order."""
    model = _tiny_model()
    predictor = Predictor(model, LabelMap.from_json(LABELS), "cpu")
    a, b = (prepare(to_rgb_uint8(_jpeg(w, h, s)), model.cfg.input) for w, h, s in ((150, 100, 3), (90, 140, 4)))
    out = predictor.predict([None, a, None, b], batch_size=2)
    assert out[0] is None and out[2] is None
    together = predictor.predict_batch([a, b])
    for got, want in zip((out[1], out[3]), together, strict=True):
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        np.testing.assert_array_equal(got["category_ids"], want["category_ids"])
    alone = predictor.predict_batch([b])[0]  # another batch: other padding, other numbers
    assert not np.array_equal(alone["scores"], out[3]["scores"])
