"""Any image → a model-ready one: RGB uint8, resized like the validation pipeline (`prepare`).

Encoded bytes go through `retina.data.transforms.decode_image` (EXIF orientation, every colour mode, known formats
only, a pixel limit), exactly as training's shards do; arrays, tensors and PIL images are converted to the same
(H, W, 3) uint8 RGB. Reading files is the caller's (local or s3://: pipelines/inference/detector.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from retina.config import InputConfig
from retina.data.transforms import decode_image, resize_image


@dataclass
class Prepared:
    """One image ready for batching: what the val pipeline (pipelines/data/datasets.py) emits per row."""

    image: np.ndarray  # (h, w, 3) uint8 RGB, resized to the model's input size
    image_size: tuple[int, int]  # (h, w) after resize
    orig_size: tuple[int, int]  # (H, W) of the original image: the boxes come back in its pixels


def _tensor_to_rgb_uint8(image: Any, name: str) -> np.ndarray:
    # Floats are 0..1 (torchvision's convention) and are rounded; integer tensors are taken as 0..255.
    import torch

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{name}: a tensor must be (3, H, W), got {tuple(image.shape)}")
    x = image.detach().cpu()
    x = x.float().mul(255.0).add_(0.5).clamp_(0, 255) if x.is_floating_point() else x.clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, W, 3) uint8


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
    return np.ascontiguousarray(arr)  # (H, W, 3) uint8


def to_rgb_uint8(image: Any, name: str = "image") -> np.ndarray:
    """Encoded bytes, a PIL image, an (H, W[, 3|4]) array or a (3, H, W) tensor → (H, W, 3) uint8 RGB.

    Errors name `name` (an `ImageDecodeError` for bytes that are not a readable image, ValueError/TypeError else).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name).image
    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image)  # a PIL image opened by the caller still carries its EXIF rotation
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        return _array_to_rgb_uint8(image, name)
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; a decode task need not import it
    if torch is not None and isinstance(image, torch.Tensor):
        return _tensor_to_rgb_uint8(image, name)
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}")


def prepare(image_rgb: np.ndarray, input_cfg: InputConfig) -> Prepared:
    """Resize like the val pipeline (`EvalTransform`): shorter side to input.min_size, longer ≤ input.max_size."""
    resized = resize_image(image_rgb, input_cfg.min_size, input_cfg.max_size)  # (h, w, 3) uint8
    return Prepared(resized, tuple(resized.shape[:2]), tuple(image_rgb.shape[:2]))


def prepare_encoded(data: bytes, name: str, input_cfg: InputConfig) -> Prepared:
    """Encoded image bytes → `Prepared`; `ImageDecodeError` naming `name` when they are not a readable image."""
    return prepare(decode_image(data, name).image, input_cfg)
