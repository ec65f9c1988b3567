"""A loaded detector and the images it takes: the notebook API and the core of batch inference.

    from pipelines.inference import load_model
    detector = load_model("models:/retinanet-demo@champion")  # or models:/NAME/VERSION, models:/<model_id>,
                                                              # runs:/<run_id>/model, a checkpoint dir (local, s3://)
    [dets] = detector.predict(["photo.jpg"])                  # PIL images, numpy arrays, (3,H,W) tensors or paths
    dets["boxes"], dets["scores"], dets["category_ids"], dets["names"]

Images go through the same steps as the validation pipeline of training (decode with EXIF/colour-mode handling,
uint8 resize by `retina.data.transforms.resize_image`, normalise + pad by `BatchCollator`, `predict_batch`), so
the detections equal what training's evaluation saw for the same image and batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cluster import s3
from pipelines.inference.loading import LoadedModel, ModelSource, load_source, resolve_model
from retina.config import ModelConfig
from retina.data.collate import BatchCollator
from retina.data.transforms import decode_image, resize_image

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W[, C]) | torch.Tensor (3, H, W) float 0..1 | str | Path


def _tensor_to_rgb_uint8(image: torch.Tensor, name: str) -> np.ndarray:
    # Floats are 0..1 (torchvision's convention) and are rounded; integer tensors are taken as 0..255.
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name}: a tensor must be (3, H, W), got {tuple(image.shape)}")
    x = image.detach().cpu()
    x = x.float().mul(255.0).add_(0.5).clamp_(0, 255) if x.is_floating_point() else x.clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _array_to_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    # Grey is repeated to 3 channels, alpha dropped; floats up to 1.0 are read as 0..1, anything else as 0..255.
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{name}: an array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0 + 0.5  # 0..1 floats
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_rgb_uint8(image: ImageLike, name: str = "image") -> np.ndarray:
    """Any supported image → (H, W, 3) uint8 RGB. Paths/s3 URIs and bytes go through `decode_image` (EXIF, modes)."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(s3.read_bytes(image), str(image)).image
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image), name).image
    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image)  # a PIL image opened by the caller still carries its EXIF rotation
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb_uint8(image, name)
    if isinstance(image, np.ndarray):
        return _array_to_rgb_uint8(image, name)
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}")


@dataclass
class Prepared:
    """One image ready for batching: what the val pipeline (pipelines/data/datasets.py) emits per row."""

    image: np.ndarray  # (h, w, 3) uint8 resized
    image_size: tuple[int, int]  # (h, w) after resize
    orig_size: tuple[int, int]  # (H, W)


def prepare(image_rgb: np.ndarray, model_cfg: ModelConfig) -> Prepared:
    """Resize like the val pipeline (`EvalTransform`): shorter side to input.min_size, longer ≤ input.max_size."""
    resized = resize_image(image_rgb, model_cfg.input.min_size, model_cfg.input.max_size)
    return Prepared(resized, tuple(resized.shape[:2]), tuple(image_rgb.shape[:2]))


class Detector:
    """A loaded RetinaNet with its label map; `predict` returns COCO category ids and class names."""

    def __init__(self, loaded: LoadedModel, source: ModelSource, device: str | torch.device | None = None):
        self.source = source
        self.label_map = loaded.label_map
        self.train_config = loaded.train_config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = loaded.model.to(self.device).eval()
        self.collate = BatchCollator.from_input_config(self.model.cfg.input)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def score_threshold(self) -> float:
        return self.model.cfg.postprocess.score_thresh

    def set_score_threshold(self, value: float) -> None:
        """Applied before NMS and the per-image cap, exactly like the model's own postprocess.score_thresh."""
        if not 0 <= value < 1:
            raise ValueError(f"score threshold must be in [0, 1), got {value}")
        cfg = self.model.cfg
        self.model.cfg = dataclasses.replace(cfg, postprocess=dataclasses.replace(cfg.postprocess, score_thresh=value))

    @torch.no_grad()
    def predict_prepared(self, items: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        """One forward pass over `items` (one batch, padded together) → per image numpy detections."""
        if not items:
            return []
        batch = self.collate(
            {
                "image": [p.image for p in items],
                "image_size": np.array([p.image_size for p in items], dtype=np.int64),
                "orig_size": np.array([p.orig_size for p in items], dtype=np.int64),
                "boxes": [np.zeros((0,), np.float32) for _ in items],
                "labels": [np.zeros((0,), np.int64) for _ in items],
                "image_id": np.arange(len(items), dtype=np.int64),
            }
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        dets = self.model.predict_batch(batch)  # boxes in original-image pixels
        return [self._to_output(d) for d in dets]

    def _to_output(self, det: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        labels = det["labels"].cpu().numpy().astype(np.int64)
        ids = np.asarray(self.label_map.coco_ids, dtype=np.int64)
        names = np.asarray(self.label_map.names, dtype=object)
        return {
            "boxes": det["boxes"].float().cpu().numpy(),  # (N, 4) xyxy in original-image pixels
            "scores": det["scores"].float().cpu().numpy(),  # (N,) descending
            "labels": labels,  # (N,) contiguous 0..K-1
            "category_ids": ids[labels],  # (N,) original COCO category ids
            "names": names[labels].tolist(),
        }

    def predict(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 8) -> list[dict[str, Any]]:
        """Detections per image: {"boxes" (N, 4) xyxy, "scores", "labels", "category_ids", "names"}.

        `images`: PIL images, numpy arrays (H, W[, 3]) uint8 or 0..1 floats, (3, H, W) tensors in 0..1, file
        paths or s3:// URIs (one of them alone is accepted too). Images are padded together per batch of
        `batch_size`, as in training's evaluation.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        prepared = [prepare(to_rgb_uint8(img, f"image {i}"), self.cfg) for i, img in enumerate(images)]
        out: list[dict[str, Any]] = []
        for start in range(0, len(prepared), max(1, batch_size)):
            out.extend(self.predict_prepared(prepared[start : start + batch_size]))
        return out

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
