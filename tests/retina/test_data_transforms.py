"""Decoding (colour modes, EXIF, bad bytes), the train/val transforms and the collate batch contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from retina import transform as T
from retina.data.collate import BatchCollator, collate_samples
from retina.data.transforms import EvalTransform, ImageDecodeError, TrainAugment, decode_image, transform_sample


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 30, w: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("make", "fmt", "mode"),
    [
        (lambda: _rgb().convert("L"), "JPEG", "L"),
        (lambda: _rgb().convert("CMYK"), "JPEG", "CMYK"),
        (lambda: _rgb().convert("P"), "PNG", "P"),
        (lambda: _rgb().convert("RGBA"), "PNG", "RGBA"),
        (lambda: _rgb().convert("LA"), "PNG", "LA"),
        (lambda: Image.fromarray(np.full((30, 40), 65535, np.uint16)), "PNG", "I;16"),
        (lambda: Image.fromarray(np.full((30, 40), 40000, np.int32)), "TIFF", "I"),
        (lambda: _rgb(), "BMP", "RGB"),
    ],
)
def test_every_colour_mode_becomes_rgb_uint8(make, fmt, mode):
    decoded = decode_image(encode(make(), fmt), "x.img")
    assert decoded.image.shape == (30, 40, 3) and decoded.image.dtype == np.uint8
    assert decoded.mode.startswith(mode[:1]) and decoded.converted == (mode != "RGB")


def test_sixteen_bit_values_are_scaled_not_clipped():
    arr = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(arr)), "x.png").image[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_exif_orientation_is_applied():
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red, right half blue, top strip green: any wrong turn shows
    pixels[:, 20:] = (0, 0, 255)
    pixels[:6] = (0, 255, 0)
    display = Image.fromarray(pixels)  # what the viewer should see: 30 x 40
    stored = display.transpose(Image.Transpose.ROTATE_90)  # 40 x 30 on disk, tag 6 says "rotate to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "rot.jpg")
    assert decoded.image.shape == (30, 40, 3) and decoded.exif_transposed
    assert np.abs(decoded.image.astype(int) - np.asarray(display, dtype=int)).mean() < 20  # JPEG noise only


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"hello, I am a text file", "not an image"),
        (encode(_rgb(200, 200), "JPEG")[:300], "cannot decode"),  # truncated
        (encode(_rgb(), "GIF"), "not an image"),  # a real image, but not an accepted format
    ],
)
def test_bad_bytes_raise_a_clear_error_naming_the_file(data, message):
    with pytest.raises(ImageDecodeError, match=rf"^dir/bad\.jpg: .*{message}"):
        decode_image(data, "dir/bad.jpg")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(encode(_rgb(100, 100)), "big.png", max_pixels=5000)


def test_resize_scales_boxes_and_flip_mirrors_them():
    image = np.zeros((100, 200, 3), np.uint8)
    image[10:30, 20:60] = 255  # a white box at xyxy (20, 10, 60, 30)
    boxes = np.array([[20, 10, 60, 30]], np.float32)
    s = transform_sample(image, boxes, np.array([3]), 7, min_size=50, max_size=1000)
    assert s.image.shape == (50, 100, 3) and s.image_size == (50, 100) and s.orig_size == (100, 200)
    np.testing.assert_allclose(s.boxes, [[10, 5, 30, 15]])
    f = transform_sample(image, boxes, np.array([3]), 7, min_size=50, max_size=1000, flip=True)
    np.testing.assert_allclose(f.boxes, [[70, 5, 90, 15]])
    np.testing.assert_array_equal(f.image, s.image[:, ::-1])
    ys, xs = np.nonzero(f.image[..., 0] > 128)  # the mirrored pixels sit inside the mirrored box
    assert xs.min() >= 70 and xs.max() < 90 and ys.min() >= 5 and ys.max() < 15


def test_resize_matches_the_model_transform_within_uint8_rounding():
    image = np.asarray(_rgb(61, 83))
    s = transform_sample(image, np.zeros((0, 4)), np.zeros(0), 1, min_size=40, max_size=100)
    ref = T.resize(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255, 40, 100)  # what model() does
    assert tuple(ref.shape[1:]) == s.image_size
    assert (torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 - ref).abs().max() <= 0.5 / 255 + 1e-6


def test_train_augment_draws_scales_and_flips_eval_is_deterministic():
    image = np.asarray(_rgb(60, 80))
    boxes = np.array([[0, 0, 10, 10]], np.float32)
    aug = TrainAugment([32, 48], max_size=200, flip_prob=0.5)
    rng = np.random.default_rng(0)
    outs = [aug(image, boxes, [1], 1, rng) for _ in range(20)]
    assert {o.image_size[0] for o in outs} == {32, 48}
    assert {float(o.boxes[0, 0]) for o in outs} - {0.0}  # some flipped
    ev = EvalTransform(48, 200)
    a, b = ev(image, boxes, [1], 1), ev(image, boxes, [1], 1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(a.boxes, [[0, 0, 8, 8]])


def test_collate_pads_to_the_contract():
    image = np.asarray(_rgb(60, 80))
    s1 = transform_sample(image, np.array([[0, 0, 10, 10], [5, 5, 20, 30]]), [0, 4], 11, min_size=100, max_size=300)
    s2 = transform_sample(np.asarray(_rgb(80, 60)), np.zeros((0, 4)), [], 12, min_size=130, max_size=300)
    b = collate_samples([s1, s2], size_divisible=128)
    assert b["images"].shape == (2, 3, 256, 256) and b["images"].dtype == torch.float32  # (100,133), (173,130)
    assert b["image_sizes"].tolist() == [[100, 133], [173, 130]] and b["image_sizes"].dtype == torch.int64
    assert b["orig_sizes"].tolist() == [[60, 80], [80, 60]]
    assert b["gt_boxes"].shape == (2, 2, 4) and (b["gt_boxes"][1] == 0).all()
    assert b["gt_labels"].tolist() == [[0, 4], [-1, -1]]
    assert b["image_ids"].tolist() == [11, 12]
    assert (b["images"][0, :, 100:, :] == 0).all() and (b["images"][0, :, :, 133:] == 0).all()  # zero padding
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (torch.from_numpy(s1.image.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(b["images"][0, :, :100, :133], expected)


def test_collate_of_empty_batch_images_keeps_one_padding_row():
    s = transform_sample(np.asarray(_rgb()), np.zeros((0, 4)), [], 1, min_size=30, max_size=100)
    b = collate_samples([s])
    assert b["gt_boxes"].shape == (1, 1, 4) and b["gt_labels"].tolist() == [[-1]]


def test_batch_collator_accepts_ray_numpy_columns():
    s1 = transform_sample(np.asarray(_rgb(60, 80)), np.array([[0, 0, 10, 10]]), [2], 1, min_size=30, max_size=100)
    s2 = transform_sample(np.asarray(_rgb(80, 60)), np.zeros((0, 4)), [], 2, min_size=30, max_size=100)
    images = np.empty(2, dtype=object)
    images[:] = [s1.image, s2.image]
    columns = {
        "image": images,
        "image_size": np.array([s1.image_size, s2.image_size]),
        "orig_size": np.array([s1.orig_size, s2.orig_size]),
        "boxes": [s1.boxes.reshape(-1), s2.boxes.reshape(-1)],
        "labels": [s1.labels, s2.labels],
        "image_id": np.array([1, 2]),
    }
    b = BatchCollator(size_divisible=32)(columns)
    ref = collate_samples([s1, s2], size_divisible=32)
    for k in ref:
        torch.testing.assert_close(b[k], ref[k])
