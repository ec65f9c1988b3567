"""Collate per-image samples into the batch the model and the training loop consume.

THE BATCH CONTRACT (B images, M = max(1, most boxes on one image in the batch)):

    "images":      float32 (B, 3, Hp, Wp)  normalised with InputConfig.image_mean/std, zero-padded at the
                   bottom/right (zero = the mean colour) up to a multiple of `size_divisible` (128: P7's stride)
    "image_sizes": int64   (B, 2)  (h, w) of each image after resize, before padding
    "orig_sizes":  int64   (B, 2)  (H, W) of the original image (the COCO JSON height/width)
    "gt_boxes":    float32 (B, M, 4) xyxy in resized-image pixels; padding rows are 0
    "gt_labels":   int64   (B, M)  contiguous labels 0..K-1; padding is -1
    "image_ids":   int64   (B,)    COCO image ids

Predicted boxes map back to original pixels with per-axis ratios orig_sizes / image_sizes.

Two entry points build the same batch:
- `collate_samples(list[Sample | dict])` for plain Python lists (tests, a torch DataLoader);
- `BatchCollator(...)(columns)` for Ray Data's ``iter_torch_batches(collate_fn=...)``, which hands over a dict of
  numpy columns as produced by ``pipelines/data.py`` (images as uint8 HWC arrays, boxes flattened xyxy).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retina import transform as T
from retina.data.transforms import Sample
from retina.ops import cpu_buffers

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def _image_tensor(image: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (h, w, 3) or float32 ndarray (3, h, w) in 0..1 → normalised float32 (3, h, w).

    A float torch tensor (3, h, w) is taken as already normalised.
    """
    if isinstance(image, torch.Tensor) and image.dtype.is_floating_point:
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.float32 and image.ndim == 3 and image.shape[0] == 3:
        return T.normalize(torch.from_numpy(np.require(image, requirements=["C", "W"])), mean, std)  # 0..1 (3, h, w)
    arr = torch.from_numpy(np.require(image, requirements=["C", "W"]))  # Arrow buffers are read-only
    if arr.dtype != torch.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"sample image must be uint8 (h, w, 3) or float (3, h, w), got {arr.dtype} {tuple(arr.shape)}")
    chw = arr.permute(2, 0, 1).float().div_(255.0)  # (3, h, w) in 0..1, exactly what ToTensor gives the model
    return T.normalize(chw, mean, std)


def _pad_uint8(
    images: Sequence[np.ndarray], size_divisible: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (h_i, w_i, 3) images → normalised, zero-padded float32 (B, 3, Hp, Wp), one pass over the pixels.

    ``(x / 255 - mean) / std`` is computed as ``x · (1 / (255 std)) + (-mean / std)`` by one ``addcmul`` per image,
    straight from the uint8 pixels into the padded batch (within 1 ulp of the three-step formula); only the
    padding margins are zeroed. This runs on the training process (Ray Data's collate thread), where every pass
    over a batch of 8 x 3 x 512 x 853 floats costs ~5 ms of a core; the buffer is huge-page advised because a
    fresh 42 MB allocation otherwise spends more time in page faults than in arithmetic.
    """
    sizes = [img.shape[:2] for img in images]
    hp, wp = T.padded_hw(sizes, size_divisible)
    out = cpu_buffers.empty((len(images), 3, hp, wp), torch.float32, torch.device("cpu"))  # (B, 3, Hp, Wp)
    std64 = torch.as_tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std64)).float()[:, None, None]  # (3, 1, 1)
    bias = (-torch.as_tensor(mean, dtype=torch.float64) / std64).float()[:, None, None]  # (3, 1, 1)
    with warnings.catch_warnings():
        # Arrow buffers are read-only; the pixels are only read here, so no defensive copy is needed
        warnings.simplefilter("ignore", UserWarning)
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[-1] != 3:
                raise ValueError(f"sample image must be uint8 (h, w, 3), got {tuple(img.shape)}")
            h, w = img.shape[:2]
            src = torch.from_numpy(np.require(img, np.uint8, ["C"])).permute(2, 0, 1)  # (3, h, w) uint8 view
            torch.addcmul(bias, src, scale, out=out[i, :, :h, :w])
            out[i, :, h:, :].zero_()  # bottom margin (zero = the mean colour after normalising)
            out[i, :, :h, w:].zero_()  # right margin
    return out


def collate_parts(
    images: Sequence[Any],
    image_sizes: Sequence[Sequence[int]],
    orig_sizes: Sequence[Sequence[int]],
    boxes: Sequence[Any],
    labels: Sequence[Any],
    image_ids: Sequence[int],
    *,
    size_divisible: int = 128,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> dict[str, torch.Tensor]:
    """Build the contract batch from per-image parts (boxes (N_i, 4) or flat (4 N_i,), labels (N_i,))."""
    if len(images) == 0:
        raise ValueError("cannot collate an empty batch")
    batch = len(images)
    if all(isinstance(img, np.ndarray) and img.dtype == np.uint8 for img in images):
        padded = _pad_uint8(images, size_divisible, mean, std)
    else:
        padded = T.batch_images([_image_tensor(img, mean, std) for img in images], size_divisible)
    box_list = [np.array(b, dtype=np.float32).reshape(-1, 4) for b in boxes]  # copies: Arrow buffers are read-only
    label_list = [np.asarray(lab, dtype=np.int64).reshape(-1) for lab in labels]
    m = max(1, max(len(b) for b in box_list))
    gt_boxes = torch.zeros((batch, m, 4), dtype=torch.float32)  # (B, M, 4) xyxy, padding rows 0
    gt_labels = torch.full((batch, m), -1, dtype=torch.int64)  # (B, M) labels 0..K-1, padding -1
    for i, (b, lab) in enumerate(zip(box_list, label_list, strict=True)):
        if len(b) != len(lab):
            raise ValueError(f"image id {image_ids[i]}: {len(b)} boxes but {len(lab)} labels")
        gt_boxes[i, : len(b)] = torch.from_numpy(b)
        gt_labels[i, : len(lab)] = torch.from_numpy(lab)
    return {
        "images": padded,  # (B, 3, Hp, Wp)
        "image_sizes": torch.from_numpy(np.array(image_sizes, dtype=np.int64).reshape(batch, 2)),
        "orig_sizes": torch.from_numpy(np.array(orig_sizes, dtype=np.int64).reshape(batch, 2)),
        "gt_boxes": gt_boxes,
        "gt_labels": gt_labels,
        "image_ids": torch.from_numpy(np.array(image_ids, dtype=np.int64).reshape(batch)),
    }


def collate_samples(
    samples: Sequence[Sample | Mapping[str, Any]],
    *,
    size_divisible: int = 128,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> dict[str, torch.Tensor]:
    """List of `Sample`s (or dicts with the same keys) → the contract batch."""
    rows = [s.__dict__ if isinstance(s, Sample) else s for s in samples]
    return collate_parts(
        [r["image"] for r in rows],
        [r["image_size"] for r in rows],
        [r["orig_size"] for r in rows],
        [r["boxes"] for r in rows],
        [r["labels"] for r in rows],
        [r["image_id"] for r in rows],
        size_divisible=size_divisible,
        mean=mean,
        std=std,
    )


@dataclass
class BatchCollator:
    """``collate_fn`` for Ray Data: dict of numpy columns (one entry per image) → the contract batch.

    Columns (as ``pipelines/data.py`` emits them): "image" uint8 (h, w, 3) per row (an object array when sizes
    differ), "image_size" (B, 2), "orig_size" (B, 2), "boxes" flattened xyxy per row, "labels" per row,
    "image_id" (B,). Picklable, so it can travel to Ray Train workers.
    """

    size_divisible: int = 128
    mean: Sequence[float] = field(default_factory=lambda: list(DEFAULT_MEAN))
    std: Sequence[float] = field(default_factory=lambda: list(DEFAULT_STD))

    @classmethod
    def from_input_config(cls, input_cfg: Any) -> BatchCollator:
        """From `retina.config.InputConfig` (size_divisible, image_mean, image_std)."""
        return cls(input_cfg.size_divisible, list(input_cfg.image_mean), list(input_cfg.image_std))

    def __call__(self, columns: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images = columns["image"]
        if isinstance(images, np.ndarray) and images.dtype != object:
            images = list(images)  # equal-sized images arrive as one (B, h, w, 3) array
        return collate_parts(
            images,
            columns["image_size"],
            columns["orig_size"],
            list(columns["boxes"]),
            list(columns["labels"]),
            columns["image_id"],
            size_divisible=self.size_divisible,
            mean=self.mean,
            std=self.std,
        )
