"""COCO evaluation (retina.evaluation) with real pycocotools and faster-coco-eval."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retina.data.coco import LabelMap
from retina.evaluation import (
    BACKENDS,
    METRICS,
    agnostic_line,
    agnostic_metrics,
    boxes_to_original,
    coco_evaluate,
    detections_to_coco,
    evaluate_detections,
    metric_safe,
    per_class_metrics,
    per_class_rows,
    per_class_table,
)


def _gt() -> dict:
    return {
        "images": [{"id": 1, "height": 200, "width": 200}, {"id": 4, "height": 100, "width": 300}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 90, "bbox": [100, 100, 80, 90], "area": 7200, "iscrowd": 0},
            {"id": 3, "image_id": 4, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 4, "image_id": 4, "category_id": 3, "bbox": [150, 0, 150, 100], "area": 15000, "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "square"}, {"id": 90, "name": "star"}],
    }


def _perfect(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]


def test_perfect_detections_score_one():
    metrics = evaluate_detections(_gt(), _perfect(_gt()))
    assert set(metrics) == set(METRICS)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_per_class_ap_separates_a_perfect_class_from_a_missed_one():
    gt = _gt()
    gt["categories"].append({"id": 12, "name": "cross/x"})  # no ground truth: not listed
    squares_only = [d for d in _perfect(gt) if d["category_id"] == 3]
    result = coco_evaluate(gt, squares_only)
    assert set(result.per_class) == {3, 90}
    assert result.per_class[3] == pytest.approx({"AP": 1.0, "AP50": 1.0})
    assert result.per_class[90] == {"AP": 0.0, "AP50": 0.0}
    assert result.metrics["AP"] == pytest.approx(0.5)  # the mean over the two classes with ground truth
    rows = per_class_rows(result, {3: "square", 90: "star", 12: "cross/x"})
    assert [(r["id"], r["name"]) for r in rows] == [(3, "square"), (90, "star")]
    assert per_class_metrics(rows, "val/") == pytest.approx(
        {"val/class_AP/square": 1.0, "val/class_AP50/square": 1.0, "val/class_AP/star": 0.0, "val/class_AP50/star": 0.0}
    )
    table = per_class_table(rows)
    assert "square" in table and "star" in table and "cross" not in table
    assert metric_safe("cross/x") == "cross_x" and metric_safe("traffic light") == "traffic light"


def test_zero_detections_score_zero_without_crashing():
    assert evaluate_detections(_gt(), []) == {k: 0.0 for k in METRICS}
    assert coco_evaluate(_gt(), []).per_class == {3: {"AP": 0.0, "AP50": 0.0}, 90: {"AP": 0.0, "AP50": 0.0}}
    assert coco_evaluate(_gt(), []).agnostic == {"AP": 0.0, "AP50": 0.0}


def test_class_agnostic_ap_separates_classification_from_localisation():
    gt = _gt()
    perfect = coco_evaluate(gt, _perfect(gt))
    assert perfect.agnostic == pytest.approx({"AP": 1.0, "AP50": 1.0})
    # every box in the right place under the wrong class: class-aware AP 0, class-agnostic AP 1
    swapped = [{**d, "category_id": 90 if d["category_id"] == 3 else 3} for d in _perfect(gt)]
    result = coco_evaluate(gt, swapped)
    assert result.metrics["AP"] == 0.0 and result.agnostic == pytest.approx({"AP": 1.0, "AP50": 1.0})
    # a box off by half its size: wrong for both (IoU < 0.5), whatever the class
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in _perfect(gt)]
    assert coco_evaluate(gt, shifted).agnostic["AP50"] == 0.0
    expected = {"val/agnostic_AP": 1.0, "val/agnostic_AP50": 1.0}
    assert agnostic_metrics(result.agnostic, "val/") == pytest.approx(expected)
    assert "class-agnostic AP 1.0000 (class-aware 0.0000)" in agnostic_line(result.agnostic, result.metrics)


def test_detections_inside_crowd_regions_are_ignored():
    dets = _perfect(_gt())
    crowd_hits = [
        {"image_id": 4, "category_id": 3, "bbox": [160 + 10 * i, 10, 30, 30], "score": 0.99} for i in range(5)
    ]
    assert evaluate_detections(_gt(), dets + crowd_hits)["AP"] == pytest.approx(1.0)
    # the same detections without the crowd region are false positives ranked first: AP drops
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert evaluate_detections(gt, dets + crowd_hits)["AP"] < 0.9


def test_undefined_area_ranges_are_zero_and_listed_and_prints_captured(capsys):
    gt = _gt()
    gt["annotations"] = [gt["annotations"][1]]  # only a medium object (area 7200): no small or large GT
    result = coco_evaluate(gt, _perfect(gt))
    assert result.metrics["APm"] == pytest.approx(1.0)
    assert result.metrics["APs"] == 0.0 and set(result.undefined) == {"APs", "APl"}
    assert result.report.startswith(" Average Precision") and len(result.report.splitlines()) >= 12
    assert capsys.readouterr().out == ""  # nothing leaked to stdout


def test_unknown_image_or_category_in_detections_is_an_error():
    with pytest.raises(ValueError, match="image_id 7"):
        evaluate_detections(_gt(), [{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(ValueError, match="category_id 5"):
        evaluate_detections(_gt(), [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}])


def test_model_outputs_map_back_to_coco_ids_and_xywh():
    label_map = LabelMap((3, 90), ("square", "star"))
    preds = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0], [100.0, 100.0, 180.0, 190.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1]),
        },
        {"boxes": np.array([[5.0, 5.0, 25.0, 25.0]]), "scores": np.array([0.7]), "labels": np.array([0])},
    ]
    results = detections_to_coco([1, 4], preds, label_map)
    assert results[1] == {
        "image_id": 1,
        "category_id": 90,
        "bbox": [100.0, 100.0, 80.0, 90.0],
        "score": pytest.approx(0.8),
    }
    assert evaluate_detections(_gt(), results)["AP"] == pytest.approx(1.0)
    np.testing.assert_allclose(boxes_to_original([[10, 20, 30, 40]], (100, 200), (50, 400)), [[20, 10, 60, 20]])


def _random_workload(seed: int) -> tuple[dict, list[dict]]:
    """150 images, 6 classes (one without ground truth), crowd regions, empty images, jittered and false
    detections: the cases where two COCOeval implementations could disagree."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 5, 7, 8, 9)]}
    dets = []
    for image_id in range(1, 151):
        gt["images"].append({"id": image_id, "height": 300, "width": 400})
        for _ in range(int(rng.integers(0, 6))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(200), size=2))
            x, y = rng.uniform(0, 400 - w), rng.uniform(0, 300 - h)
            cat = int(rng.choice([1, 2, 5, 7, 8]))
            crowd = int(rng.random() < 0.05)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": crowd})  # fmt: skip
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
                label = cat if rng.random() < 0.8 else int(rng.choice([1, 2, 5, 7, 8, 9]))
                dets.append({"image_id": image_id, "category_id": label, "bbox": list(np.array([x, y, w, h]) + jitter),
                             "score": float(rng.uniform(0.2, 1))})  # fmt: skip
        for _ in range(int(rng.integers(0, 4))):
            box = [*rng.uniform(0, 200, 2), *rng.uniform(5, 100, 2)]
            dets.append({"image_id": image_id, "category_id": int(rng.choice([1, 2, 5, 7, 8, 9])), "bbox": box,
                         "score": float(rng.random())})  # fmt: skip
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1])
def test_backends_agree_on_every_number(seed):
    gt, dets = _random_workload(seed)
    reference, fast = (coco_evaluate(gt, dets, backend=b) for b in BACKENDS)
    assert 0.1 < reference.metrics["AP"] < 0.9  # a workload with something to get right and wrong
    for key in METRICS:
        assert fast.metrics[key] == pytest.approx(reference.metrics[key], abs=1e-12), key
    assert fast.per_class.keys() == reference.per_class.keys() and 9 not in reference.per_class
    for cat, row in reference.per_class.items():
        assert fast.per_class[cat] == pytest.approx(row, abs=1e-12)
    assert fast.agnostic == pytest.approx(reference.agnostic, abs=1e-12)
    assert fast.undefined == reference.undefined
    # the same 12-line summary; faster-coco-eval adds AR at IoU 0.5 and 0.75
    assert fast.report.splitlines()[:12] == reference.report.splitlines()


def test_unknown_backend_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="unknown COCOeval backend 'fast'.*pycocotools"):
        coco_evaluate(_gt(), _perfect(_gt()), backend="fast")
