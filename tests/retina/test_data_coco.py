"""COCO parsing and validation (retina.data.coco): every structural error names the file, record and field;
geometric problems are repaired or skipped and counted; the shard → COCO round trip is exact."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from retina.data.coco import DataError, LabelMap, coco_gt_from_rows, parse_coco, safe_relative_path


def _coco() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 100, "width": 200},
            {"id": 2, "file_name": "sub/b.jpg", "height": 50, "width": 50},
            {"id": 5, "file_name": "c.jpg", "height": 80, "width": 60},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 90, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 1},
        ],
        "categories": [{"id": 90, "name": "star"}, {"id": 3, "name": "square"}, {"id": 7, "name": "tri"}],
    }


def _bytes(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_valid_file_targets_labels_and_counts():
    parsed = parse_coco(_bytes(_coco()), "ann.json")
    assert parsed.label_map.coco_ids == (3, 7, 90)  # sorted COCO ids → labels 0, 1, 2
    assert parsed.label_map.to_label(90) == 2 and parsed.label_map.to_coco_id(0) == 3
    by_id = {r.image_id: r for r in parsed.images}
    assert [r.image_id for r in parsed.images] == [1, 2, 5]
    np.testing.assert_allclose(by_id[1].boxes, [[10, 20, 40, 60], [0, 0, 5, 5]])  # xywh → xyxy
    assert by_id[1].labels.tolist() == [2, 0]
    assert by_id[2].boxes.shape == (0, 4) and by_id[2].crowd_boxes.tolist() == [[1, 1, 11, 11]]  # iscrowd
    assert by_id[2].crowd_labels.tolist() == [0]
    assert by_id[5].boxes.shape == (0, 4)  # image without annotations: kept
    assert parsed.counts["images_without_annotations"] == 1
    assert parsed.counts["images_only_crowd"] == 1
    assert parsed.counts["crowd"] == 1 and parsed.issues == []


def test_label_map_json_round_trip():
    m = LabelMap((1, 3, 90), ("a", "b", "c"))
    assert LabelMap.from_json(m.to_json()) == m
    assert m.to_json()[2] == {"id": 90, "name": "c", "label": 2}


def test_degenerate_clipped_outside_boxes_are_counted():
    d = _coco()
    d["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
        {"id": 21, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, -3], "area": 0, "iscrowd": 0},
        {"id": 22, "image_id": 1, "category_id": 3, "bbox": [190, -10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 23, "image_id": 1, "category_id": 3, "bbox": [250, 10, 10, 10], "area": 100, "iscrowd": 0},
    ]
    parsed = parse_coco(_bytes(d), "ann.json")
    assert (parsed.counts["degenerate"], parsed.counts["clipped"], parsed.counts["outside"]) == (2, 1, 1)
    kinds = {(i.kind, i.annotation_id) for i in parsed.issues}
    assert kinds == {("degenerate", 20), ("degenerate", 21), ("clipped", 22), ("outside", 23)}
    boxes = parsed.images[0].boxes
    assert boxes.tolist()[-1] == [190, 0, 200, 20]  # clipped into [0, W] x [0, H]
    assert len(boxes) == 3
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()  # never a degenerate box


def _mutate(fn) -> dict:
    d = copy.deepcopy(_coco())
    fn(d)
    return d


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda d: d["annotations"][0].update(image_id=99), r"annotation id 10 .*image_id.*unknown image"),
        (lambda d: d["annotations"][0].update(category_id=4), r"annotation id 10 .*category_id' 4"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"annotation id 10: duplicate annotation id"),
        (lambda d: d["images"].append(dict(d["images"][0])), r"image id 1: duplicate image id"),
        (lambda d: d["categories"].append({"id": 3, "name": "x"}), r"category id 3: duplicate category id"),
        (lambda d: d["annotations"][1].update(bbox=[]), r"annotation id 11 \(image id 1\): field 'bbox'"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, "a", 4]), r"annotation id 11 .*'bbox'"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, float("nan"), 4]), r"annotation id 11 .*'bbox'"),
        (lambda d: d["annotations"][1].pop("iscrowd"), r"annotation id 11 .*missing required field 'iscrowd'"),
        (lambda d: d["annotations"][1].pop("area"), r"annotation id 11 .*missing required field 'area'"),
        (lambda d: d["annotations"][1].pop("bbox"), r"annotation id 11 .*missing required field 'bbox'"),
        (lambda d: d["images"][1].pop("height"), r"image id 2: missing required field 'height'"),
        (lambda d: d["images"][1].update(width=0), r"image id 2: height/width must be positive"),
        (lambda d: d["images"][0].update(file_name="../etc/passwd"), r"image id 1: .*escapes the image root"),
        (lambda d: d["images"][0].update(file_name="a/../../x.jpg"), r"image id 1: .*escapes the image root"),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), r"image id 1: .*must be relative"),
        (lambda d: d["images"][0].update(file_name="s3://other/x.jpg"), r"image id 1: .*must be relative"),
        (lambda d: d["images"][0].update(file_name="C:\\x.jpg"), r"image id 1: .*"),
        (lambda d: d.pop("categories"), r"missing required top-level key 'categories'"),
        (lambda d: d.update(categories=[]), r"'categories' is empty"),
        (lambda d: d.update(images={}), r"'images' must be a list"),
    ],
)
def test_structural_errors_name_file_record_and_field(mutation, expected):
    with pytest.raises(DataError, match=r"^ann\.json: " + expected):
        parse_coco(_bytes(_mutate(mutation)), "ann.json")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_an_error_naming_the_file(raw):
    with pytest.raises(DataError, match=r"^data/ann\.json: "):
        parse_coco(raw, "data/ann.json")


def test_safe_relative_path_normalises_harmless_forms():
    assert safe_relative_path("./a//b.jpg", "x") == "a/b.jpg"
    for bad in ("", "..", "a/..", "\\\\server\\x", "http://x/y.jpg", "file:///etc/passwd", "a\x00b"):
        with pytest.raises(DataError):
            safe_relative_path(bad, "x")


def test_round_trip_rows_to_coco_gt_equals_source_minus_skips():
    d = _coco()
    d["annotations"].append(
        {"id": 30, "image_id": 5, "category_id": 7, "bbox": [-5, 10, 20, 10], "area": 200, "iscrowd": 0}
    )
    d["annotations"].append({"id": 31, "image_id": 5, "category_id": 7, "bbox": [1, 1, 0, 1], "area": 0, "iscrowd": 0})
    parsed = parse_coco(_bytes(d), "ann.json")
    gt = coco_gt_from_rows([r.to_row() for r in parsed.images], parsed.label_map)

    def key(a):
        return (a["image_id"], a["category_id"], tuple(round(v, 4) for v in a["bbox"]), a["iscrowd"])

    expected = [a for a in d["annotations"] if a["id"] != 31]  # the degenerate one is the counted skip
    expected[-1] = {**expected[-1], "bbox": [0, 10, 15, 10]}  # the clipped one, as clipped
    assert sorted(map(key, gt["annotations"])) == sorted(map(key, expected))
    assert [i["id"] for i in gt["images"]] == [1, 2, 5]
    assert {c["id"] for c in gt["categories"]} == {3, 7, 90}
    assert all(a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3]) for a in gt["annotations"])
