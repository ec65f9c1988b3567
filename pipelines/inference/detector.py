"""A loaded detector and the images it takes: the notebook API.

    from pipelines.inference import load_model
    detector = load_model("models:/retinanet-demo@champion")  # or models:/NAME/VERSION, models:/<model_id>,
                                                              # runs:/<run_id>/model, a checkpoint dir (local, s3://)
    [dets] = detector.predict(["photo.jpg"])                  # PIL images, numpy arrays, (3,H,W) tensors or paths
    dets["boxes"], dets["scores"], dets["category_ids"], dets["names"]

A `Detector` is the prediction core (`retina.inference`: decode with EXIF/colour-mode handling, the val pipeline's
uint8 resize, `BatchCollator`'s normalise + pad, `predict_batch`, COCO ids and names) plus where the model came from
and how it was trained. The Ray Data batch job and the MLflow pyfunc model run the same core, so an image gets the
same detections from each of them and from training's evaluation, given the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cluster import s3
from pipelines.inference.loading import ModelSource, load_source, resolve_model
from retina.config import ModelConfig
from retina.data.coco import LabelMap
from retina.inference import images as core_images
from retina.inference.bundle import Bundle
from retina.inference.predictor import DEFAULT_BATCH_SIZE, Detections, Predictor

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W[, C]) | torch.Tensor (3, H, W) float 0..1 | bytes | str | Path


def to_rgb_uint8(image: ImageLike, name: str = "image") -> np.ndarray:
    """Any supported image → (H, W, 3) uint8 RGB; a path or s3:// URI is read first (its bytes decoded)."""
    if isinstance(image, (str, os.PathLike)):
        return core_images.to_rgb_uint8(s3.read_bytes(image), str(image))
    return core_images.to_rgb_uint8(image, name)


class Detector:
    """A loaded RetinaNet with its label map; `predict` returns COCO category ids and class names."""

    def __init__(self, loaded: Bundle, source: ModelSource, device: str | torch.device | None = None):
        self.source = source
        self.train_config = loaded.config  # the training run's config (data.val_batch_size ...); {} when unknown
        self.predictor = Predictor(loaded.model, loaded.label_map, device)

    @property
    def model(self) -> Any:  # retina.model.RetinaNet, in eval mode on `device`
        return self.predictor.model

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def label_map(self) -> LabelMap:
        return self.predictor.label_map

    @property
    def cfg(self) -> ModelConfig:
        return self.predictor.cfg

    @property
    def score_threshold(self) -> float:
        return self.predictor.score_threshold

    def set_score_threshold(self, value: float) -> None:
        """Applied before NMS and the per-image cap, exactly like the model's own postprocess.score_thresh."""
        self.predictor.set_score_threshold(value)

    def predict(
        self, images: Sequence[ImageLike] | ImageLike, batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[Detections]:
        """Detections per image: {"boxes" (N, 4) xyxy, "scores", "labels", "category_ids", "names"}.

        `images`: PIL images, numpy arrays (H, W[, 3]) uint8 or 0..1 floats, (3, H, W) tensors in 0..1, encoded
        bytes, file paths or s3:// URIs (one of them alone is accepted too). Images are padded together per batch
        of `batch_size`, as in training's evaluation. An image that cannot be read raises, naming it.
        """
        if isinstance(images, (str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        prepared = [self.prepare(img, f"image {i}") for i, img in enumerate(images)]
        return self.predictor.predict(prepared, batch_size)  # every item prepared: no None comes back

    def prepare(self, image: ImageLike, name: str = "image") -> core_images.Prepared:
        """One image decoded and resized to this model's input size."""
        return core_images.prepare(to_rgb_uint8(image, name), self.cfg.input)

    def __repr__(self) -> str:
        return f"Detector({self.source.describe()}, {self.label_map.num_classes} classes, device={self.device})"


def load_model(
    uri: str | ModelSource,
    *,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    score_threshold: float | None = None,
    s3_settings: s3.S3Settings | None = None,
) -> Detector:
    """A `Detector` for a model URI (see module docstring); ModelLoadError naming the URI when it fails."""
    source = uri if isinstance(uri, ModelSource) else resolve_model(uri, tracking_uri)
    detector = Detector(load_source(source, s3_settings), source, device)
    if score_threshold is not None:
        detector.set_score_threshold(score_threshold)
    return detector
