"""Prepared images → detections: collate, one forward pass per batch, labels mapped to COCO ids and names.

`Predictor` is the one place where a trained RetinaNet meets images outside training: `Detector.predict`, the Ray
Data actors of the batch job and the MLflow pyfunc model all call `Predictor.predict`. Images are padded together
per batch exactly as training's evaluation pads them (`BatchCollator`), so with the same batches the detections
equal what the evaluation saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from retina.config import ModelConfig
from retina.data.coco import LabelMap
from retina.data.collate import BatchCollator
from retina.inference.images import Prepared
from retina.model import RetinaNet

DEFAULT_BATCH_SIZE = 8  # images per forward pass unless the caller says otherwise

# One image's detections: "boxes" (N, 4) float32 x1, y1, x2, y2 in its original pixels, "scores" (N,) float32
# descending, "labels" (N,) int64 contiguous 0..K-1, "category_ids" (N,) int64 COCO ids, "names" list of N str.
Detections = dict[str, Any]


class Predictor:
    """A RetinaNet in eval mode with its label map, on one device."""

    def __init__(self, model: RetinaNet, label_map: LabelMap, device: str | torch.device | None = None):
        if model.cfg.num_classes != label_map.num_classes:
            raise ValueError(f"the model has {model.cfg.num_classes} classes but its label map {label_map.num_classes}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.label_map = label_map
        self.collate = BatchCollator.from_input_config(model.cfg.input)
        self._coco_ids = np.asarray(label_map.coco_ids, dtype=np.int64)  # (K,) label → COCO id
        self._names = np.asarray(label_map.names, dtype=object)  # (K,) label → class name

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
    def predict_batch(self, items: Sequence[Prepared]) -> list[Detections]:
        """One forward pass over `items` (padded together) → per image detections, in order."""
        if not items:
            return []
        batch = self.collate(
            {
                "image": [p.image for p in items],  # ragged (h, w, 3) uint8
                "image_size": np.array([p.image_size for p in items], dtype=np.int64),  # (B, 2)
                "orig_size": np.array([p.orig_size for p in items], dtype=np.int64),  # (B, 2)
                "boxes": [np.zeros((0,), np.float32) for _ in items],  # no ground truth at inference
                "labels": [np.zeros((0,), np.int64) for _ in items],
                "image_id": np.arange(len(items), dtype=np.int64),  # (B,)
            }
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return [self._detections(d) for d in self.model.predict_batch(batch)]  # boxes in original-image pixels

    def predict(
        self, items: Sequence[Prepared | None], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> list[Detections | None]:
        """Detections per item, in order, `batch_size` images per forward pass.

        A None item (an image its caller could not read or decode) stays None and takes no place in a batch, so
        one bad image changes neither its neighbours' batches' size nor their padding beyond its absence.
        """
        present = [i for i, item in enumerate(items) if item is not None]
        out: list[Detections | None] = [None] * len(items)
        step = max(1, batch_size)
        for start in range(0, len(present), step):
            chunk = present[start : start + step]
            for i, det in zip(chunk, self.predict_batch([items[i] for i in chunk]), strict=True):
                out[i] = det
        return out

    def _detections(self, det: dict[str, torch.Tensor]) -> Detections:
        labels = det["labels"].cpu().numpy().astype(np.int64)  # (N,) 0..K-1
        return {
            "boxes": det["boxes"].float().cpu().numpy(),  # (N, 4) xyxy in original-image pixels
            "scores": det["scores"].float().cpu().numpy(),  # (N,) descending
            "labels": labels,
            "category_ids": self._coco_ids[labels],  # (N,) original COCO category ids
            "names": self._names[labels].tolist(),  # N class names
        }
