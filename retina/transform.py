"""Resize, normalise and pad images the way the detector expects (torchvision's GeneralizedRCNNTransform maths).

Used by the model's torchvision-convention entry point and by the data pipeline, so that training batches
prepared on CPU workers and images passed straight to ``model(images)`` go through identical arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resized_hw(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """Output (height, width) and scale: the shorter side to `min_size` unless the longer exceeds `max_size`."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    # floor(size * scale), as F.interpolate(scale_factor=..., recompute_scale_factor=True) computes it
    return int(math.floor(height * scale)), int(math.floor(width * scale)), scale


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """image: (3, H, W) float in 0..1 → (3, H, W) standardised per channel."""
    m = torch.as_tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
    s = torch.as_tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - m) / s


def resize(image: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """image: (C, H, W) float → (C, H', W') bilinear, with (H', W') from `resized_hw`."""
    h, w = image.shape[-2:]
    _, _, scale = resized_hw(h, w, min_size, max_size)
    return F.interpolate(
        image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )[0]


def resize_boxes(boxes: torch.Tensor, old_hw: Sequence[int], new_hw: Sequence[int]) -> torch.Tensor:
    """boxes: (N, 4) xyxy in the old image → (N, 4) xyxy in the new image (per-axis ratios)."""
    ratio_h = new_hw[0] / old_hw[0]
    ratio_w = new_hw[1] / old_hw[1]
    scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def padded_hw(sizes: Sequence[Sequence[int]], size_divisible: int) -> tuple[int, int]:
    """Smallest (H, W) that holds every image and is a multiple of `size_divisible`."""
    max_h = max(int(s[0]) for s in sizes)
    max_w = max(int(s[1]) for s in sizes)
    return (
        int(math.ceil(max_h / size_divisible) * size_divisible),
        int(math.ceil(max_w / size_divisible) * size_divisible),
    )


def batch_images(images: Sequence[torch.Tensor], size_divisible: int) -> torch.Tensor:
    """List of (3, H_i, W_i) → (B, 3, H, W) zero-padded at the bottom/right (zero = the mean colour)."""
    h, w = padded_hw([img.shape[-2:] for img in images], size_divisible)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]].copy_(img)
    return out
