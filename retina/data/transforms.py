"""Decode encoded images to RGB and turn them into resized (optionally flipped) samples.

Decoding is defensive because shards hold the *original* bytes: EXIF orientation is applied, every colour mode
(L, LA, P, PA, RGBA, CMYK, I;16, I, F, 1) ends as (H, W, 3) uint8 RGB, only known formats are opened, and
oversized images are refused before their pixels are decoded (decompression bombs).

The resize goes through `retina.transform` (the model's own arithmetic): the output size comes from
`resized_hw` and the pixels from `resize`'s bilinear interpolation. A sample keeps the resized image as uint8
(H', W', 3): that is 4x less data to move between Ray workers than float32; normalisation happens in
`retina.data.collate`. Rounding to uint8 after interpolation changes pixel values by at most 0.5/255.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


# Formats the pipeline accepts; anything else (FITS, PSD, ...) is refused before a plugin parses it.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# 64 MP: above any real photo dataset image, far below what would exhaust a worker's memory.
MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a readable image of an accepted format; the message names the file."""


@dataclass
class Decoded:
    image: np.ndarray  # (H, W, 3) uint8 RGB, EXIF orientation applied
    mode: str  # the PIL mode of the encoded image before conversion (e.g. "CMYK", "I;16")
    exif_transposed: bool  # True when the EXIF orientation tag rotated/flipped the pixels

    @property
    def converted(self) -> bool:
        return self.mode != "RGB"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("L") clips 16/32-bit values at 255; scale the 16-bit range down instead.
        arr = np.asarray(img).astype(np.float32)
        if img.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in 0..1
        elif img.mode != "F":
            arr = arr / 257.0  # 0..65535 → 0..255
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    # P/PA/RGBA/LA: alpha is dropped (as detectron2 does); CMYK/YCbCr/L/1: PIL's conversions.
    return img.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Decoded:
    """Encoded bytes → RGB uint8 (H, W, 3) with EXIF orientation applied; raise ImageDecodeError naming `name`."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and 2x; our own limit below is the one that matters.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)"
                )
            img.load()  # truncated files fail here (LOAD_TRUNCATED_IMAGES stays False on purpose)
            mode = img.mode
            orientation = img.getexif().get(0x0112, 1)  # 1 = already upright
            if orientation not in (None, 1):
                img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            return Decoded(np.asarray(rgb, dtype=np.uint8), mode, orientation not in (None, 1))
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image in an accepted format {FORMATS}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode image: {exc}") from None


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Shortcut: (H, W, 3) uint8 RGB."""
    return decode_image(data, name).image


# ------------------------------------------------------------------------------------------------ resize / flip


@dataclass
class Sample:
    """One model-ready image before batching (see `retina.data.collate` for the batch it becomes)."""

    image: np.ndarray  # (h, w, 3) uint8 RGB, resized
    image_size: tuple[int, int]  # (h, w) after resize
    orig_size: tuple[int, int]  # (H, W) of the original image
    boxes: np.ndarray  # (N, 4) float32 xyxy in resized-image pixels
    labels: np.ndarray  # (N,) int64 contiguous labels
    image_id: int


def resize_image(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (h, w, 3) uint8 via `retina.transform.resize` (bilinear on floats 0..1, as the model)."""
    import torch  # here, not at the top: see `_resize_boxes`

    from retina import transform as T

    chw = (
        torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    )  # (3, H, W) in 0..1
    out = T.resize(chw, min_size, max_size)  # (3, h, w)
    return out.mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _resize_boxes(boxes: np.ndarray, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
    """(N, 4) xyxy float32 boxes scaled by the per-axis ratios, with the model's own `retina.transform.resize_boxes`.

    torch is imported on the first call, not with this module: every process that unpickles a Dataset plan holding
    these transforms imports the module (Ray Data's split coordinators, read and repartition tasks, Ray Train's
    dataset manager), and torch's import is ~1.5 s of CPU in each, on the path to the first training step.
    """
    import torch

    from retina import transform as T

    return T.resize_boxes(torch.from_numpy(boxes), old_hw, new_hw).numpy()


def transform_sample(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    image_id: int,
    *,
    min_size: int,
    max_size: int,
    flip: bool = False,
) -> Sample:
    """Resize to `min_size`/`max_size`, scale boxes by the per-axis ratios, optionally flip horizontally."""
    orig_h, orig_w = image.shape[:2]
    resized = resize_image(image, min_size, max_size)
    h, w = resized.shape[:2]
    out_boxes = _resize_boxes(np.array(boxes, dtype=np.float32).reshape(-1, 4), (orig_h, orig_w), (h, w))
    if flip:
        resized = np.ascontiguousarray(resized[:, ::-1])
        # Continuous pixel-edge coordinates: x' = w - x, so (x1, x2) → (w - x2, w - x1).
        out_boxes = np.stack([w - out_boxes[:, 2], out_boxes[:, 1], w - out_boxes[:, 0], out_boxes[:, 3]], 1)
    return Sample(
        image=resized,
        image_size=(h, w),
        orig_size=(orig_h, orig_w),
        boxes=out_boxes.astype(np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1),
        image_id=int(image_id),
    )


@dataclass
class TrainAugment:
    """Training transform: a random shorter side from `min_sizes` (multi-scale) and a random horizontal flip."""

    min_sizes: Sequence[int]
    max_size: int
    flip_prob: float = 0.5

    def __call__(self, image, boxes, labels, image_id, rng: np.random.Generator) -> Sample:
        min_size = int(self.min_sizes[int(rng.integers(len(self.min_sizes)))])
        flip = bool(rng.random() < self.flip_prob)
        return transform_sample(image, boxes, labels, image_id, min_size=min_size, max_size=self.max_size, flip=flip)


@dataclass
class EvalTransform:
    """Validation/test transform: deterministic resize, no augmentation."""

    min_size: int
    max_size: int

    def __call__(self, image, boxes, labels, image_id, rng: np.random.Generator | None = None) -> Sample:
        return transform_sample(image, boxes, labels, image_id, min_size=self.min_size, max_size=self.max_size)
