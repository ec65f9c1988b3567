"""The synthetic sample dataset: deterministic, valid COCO, and the variety the demo relies on."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from retina.data.coco import parse_coco
from retina.data.synthetic import CATEGORIES, COCO_IDS, generate


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", 12, seed=5)
    b = generate(tmp_path / "b", 12, seed=5)
    c = generate(tmp_path / "c", 12, seed=6)
    assert a.read_bytes() == b.read_bytes()
    for img in sorted((tmp_path / "a" / "images").iterdir()):
        assert img.read_bytes() == (tmp_path / "b" / "images" / img.name).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_content_is_valid_varied_and_imbalanced(tmp_path):
    path = generate(tmp_path, 300, seed=0)
    coco = json.loads(path.read_text())
    parsed = parse_coco(path.read_bytes(), str(path))  # validates every record
    assert parsed.issues == []  # exact boxes: nothing to clip or drop
    assert [c["id"] for c in coco["categories"]] == [1, 3, 7, 12, 90]  # non-contiguous ids

    anns = [a for a in coco["annotations"] if not a["iscrowd"]]
    freq = Counter(a["category_id"] for a in anns)
    ordered = [freq[cid] for cid, _, _ in CATEGORIES]
    assert ordered == sorted(ordered, reverse=True) and ordered[0] > 3 * ordered[-1] > 0  # imbalanced

    empty = parsed.counts["images_without_annotations"]
    assert 0.04 * 300 <= empty <= 0.18 * 300  # ~10% pure negatives
    assert parsed.counts["crowd"] >= 5  # some iscrowd groups

    sides = np.array([max(a["bbox"][2:]) for a in anns])
    assert (sides < 16).sum() > 20 and (sides > 96).sum() > 20  # small and large objects both occur
    shapes = {(i["height"], i["width"]) for i in coco["images"]}
    assert len(shapes) > 50 and any(h != w for h, w in shapes)
    assert all(192 <= h <= 320 and 192 <= w <= 320 for h, w in shapes)
    for a in anns:
        assert a["area"] == a["bbox"][2] * a["bbox"][3]


def test_boxes_lie_inside_their_images(tmp_path):
    path = generate(tmp_path, 20, seed=1)
    coco = json.loads(path.read_text())
    images = {i["id"]: i for i in coco["images"]}
    checked = 0
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        if a["iscrowd"] or w < 20 or h < 20:
            continue
        img = np.asarray(Image.open(tmp_path / "images" / images[a["image_id"]]["file_name"]), dtype=np.float32)
        assert 0 <= x and 0 <= y and x + w <= img.shape[1] and y + h <= img.shape[0]
        checked += 1
    assert checked > 10


def test_coco_profile_has_cocos_shape_and_parallel_rendering_changes_nothing(tmp_path):
    serial = generate(tmp_path / "serial", 120, seed=1, profile="coco")
    parallel = generate(tmp_path / "parallel", 120, seed=1, profile="coco", workers=2)
    assert serial.read_bytes() == parallel.read_bytes()
    coco = json.loads(serial.read_text())
    assert parse_coco(serial.read_bytes(), str(serial)).issues == []
    assert [c["id"] for c in coco["categories"]] == list(COCO_IDS) and len(COCO_IDS) == 80
    assert {max(i["height"], i["width"]) for i in coco["images"]} == {640}
    assert all(360 <= min(i["height"], i["width"]) <= 480 for i in coco["images"])
    per_image = Counter(a["image_id"] for a in coco["annotations"] if not a["iscrowd"])
    mean = sum(per_image.values()) / len(coco["images"])
    assert 5.5 < mean < 9.5, mean  # COCO train2017: 7.3 objects per image
    areas = np.array([a["area"] for a in coco["annotations"] if not a["iscrowd"]])
    small, large = np.mean(areas < 32**2), np.mean(areas >= 96**2)
    assert 0.3 < small < 0.55 and 0.15 < large < 0.4, (small, large)  # COCO: 41% small, 24% large
    by_class = Counter(a["category_id"] for a in coco["annotations"])
    assert by_class[1] == max(by_class.values())  # the first class dominates, as "person" does in COCO


def test_unknown_profile_is_an_error_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'imagenet'.*coco"):
        generate(tmp_path, 1, profile="imagenet")
