"""Distributed evaluation inside the Ray Train workers: every rank predicts its part of the val split
(`predict_split`), rank 0 gathers the predictions, and COCOeval scores them (`score`: crowd regions honoured →
``val/AP`` ... ``val/APl``), on rank 0 (`evaluate`) or in a background Ray task (`background_eval`).

Unequal val parts cannot hang: inference runs on the bare model (no DDP collectives per batch), and the
only collective is one `gather_object` per evaluation, which every rank reaches after its own last batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.training.distributed import gather_objects_to_rank0
from retina.confusion import confusion_summary
from retina.evaluation import DEFAULT_BACKEND, CocoEvalResult, coco_evaluate, detections_to_coco
from retina.model import RetinaNet


@dataclass
class VisualSample:
    """One val image for the MLflow gallery, in resized-image pixels."""

    image_id: int
    image: np.ndarray  # (h, w, 3) uint8 RGB, the resized image without padding
    gt_boxes: np.ndarray  # (M, 4) xyxy
    gt_labels: np.ndarray  # (M,)
    pred_boxes: np.ndarray  # (N, 4) xyxy
    pred_scores: np.ndarray  # (N,)
    pred_labels: np.ndarray  # (N,)


@dataclass
class EvalResult:
    """On rank 0: the COCO metrics and report; on other ranks `coco` is None."""

    coco: CocoEvalResult | None
    num_images: int  # images predicted, over all ranks (rank 0 only)
    num_detections: int
    samples: list[VisualSample] = field(default_factory=list)  # rank 0's first images
    confusion: list[dict[str, Any]] = field(default_factory=list)  # per class: found as itself/another/missed

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.coco.metrics.items()} if self.coco else {}


def _denormalize(image: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """(3, h, w) normalised float → (h, w, 3) uint8 RGB."""
    m = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    x = (image.float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def _visual_sample(batch: dict[str, torch.Tensor], i: int, det: dict[str, torch.Tensor], model: RetinaNet):
    h, w = batch["image_sizes"][i].tolist()
    oh, ow = batch["orig_sizes"][i].tolist()
    scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])  # original → resized pixels
    valid = batch["gt_labels"][i] >= 0
    keep = det["scores"].float().cpu() >= 0.3  # the gallery shows confident detections only
    return VisualSample(
        image_id=int(batch["image_ids"][i]),
        image=_denormalize(batch["images"][i, :, :h, :w], model.cfg.input.image_mean, model.cfg.input.image_std),
        gt_boxes=batch["gt_boxes"][i][valid].cpu().numpy(),
        gt_labels=batch["gt_labels"][i][valid].cpu().numpy(),
        pred_boxes=(det["boxes"].float().cpu()[keep] * scale).numpy(),
        pred_scores=det["scores"].float().cpu()[keep].numpy(),
        pred_labels=det["labels"].cpu()[keep].numpy(),
    )


@dataclass
class Predictions:
    """Every rank's predictions of the val split, gathered on rank 0 (numpy only: cheap to hand to a Ray task)."""

    image_ids: list[int]
    predictions: list[dict[str, np.ndarray]]  # per image: "boxes" (N, 4) xyxy original px, "scores", "labels"
    samples: list[VisualSample] = field(default_factory=list)  # rank 0's first images, for the gallery


@torch.no_grad()
def predict_split(
    model: RetinaNet,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    num_samples: int = 0,
) -> Predictions | None:
    """Predict every batch of this rank's val part and gather them: the `Predictions` on rank 0, None elsewhere.

    `model` is the bare RetinaNet (not the DDP wrapper)."""
    was_training = model.training
    model.eval()
    image_ids: list[int] = []
    predictions: list[dict[str, np.ndarray]] = []
    samples: list[VisualSample] = []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            dets = model.predict_batch(batch)  # boxes in original-image pixels
        for i, det in enumerate(dets):
            image_ids.append(int(batch["image_ids"][i]))
            predictions.append(
                {
                    "boxes": det["boxes"].float().cpu().numpy(),  # (N, 4) xyxy
                    "scores": det["scores"].float().cpu().numpy(),  # (N,)
                    "labels": det["labels"].cpu().numpy(),  # (N,) contiguous
                }
            )
            if len(samples) < num_samples:
                samples.append(_visual_sample(batch, i, det, model))
    model.train(was_training)

    rank, gathered = gather_objects_to_rank0((image_ids, predictions))
    if rank != 0:
        return None
    all_ids = [i for ids, _ in gathered for i in ids]
    all_preds = [p for _, preds in gathered for p in preds]
    return Predictions(all_ids, all_preds, samples)


def score(
    gt: dict[str, Any], predictions: Predictions, coco_ids: list[int], backend: str = DEFAULT_BACKEND
) -> EvalResult:
    """COCOeval of gathered predictions against the val ground truth (rank 0, or a background Ray task)."""
    expected = {int(img["id"]) for img in gt["images"]}
    ids = predictions.image_ids
    if set(ids) != expected or len(ids) != len(expected):
        raise RuntimeError(
            f"evaluation saw {len(ids)} predictions for {len(set(ids))} distinct images, but the val "
            f"ground truth has {len(expected)} images: the val split lost or duplicated rows"
        )
    results = detections_to_coco(ids, predictions.predictions, coco_ids)
    return EvalResult(coco_evaluate(gt, results, backend), len(ids), len(results), predictions.samples,
                      confusion_summary(gt, results))  # fmt: skip


def evaluate(
    model: RetinaNet,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    coco_ids: list[int],
    load_gt: Callable[[], dict[str, Any]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    num_samples: int = 0,
    backend: str = DEFAULT_BACKEND,
) -> EvalResult:
    """Predict every rank's part, gather to rank 0 and evaluate there, synchronously (`load_gt`: rank 0 only)."""
    predictions = predict_split(model, batches, device=device, autocast=autocast, num_samples=num_samples)
    if predictions is None:
        return EvalResult(coco=None, num_images=0, num_detections=0)
    return score(load_gt(), predictions, coco_ids, backend)
