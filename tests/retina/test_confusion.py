"""The per-class confusion summary on hand-made ground truth and detections."""

from __future__ import annotations

from retina.confusion import confusion_summary, confusion_table

GT = {
    "images": [{"id": 1}, {"id": 2}],
    "categories": [{"id": 1, "name": "circle"}, {"id": 7, "name": "star"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 20, 10, 10], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [50, 50, 10, 10], "iscrowd": 1},  # crowd: never an object
    ],
}


def det(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_found_as_itself_as_another_class_missed_and_false_positives():
    detections = [
        det(1, 1, [0, 0, 10, 10], 0.9),  # circle found as circle
        det(1, 1, [1, 1, 10, 10], 0.8),  # a duplicate: the circle is taken, so a false positive
        det(1, 1, [20, 20, 10, 10], 0.7),  # the star found as a circle
        det(2, 7, [50, 50, 10, 10], 0.95),  # on the crowd region only: a false positive
        det(2, 1, [0, 0, 10, 10], 0.1),  # below the score threshold: not counted, so image 2's circle is missed
    ]
    rows = {r["name"]: r for r in confusion_summary(GT, detections)}
    assert rows["circle"] == {"id": 1, "name": "circle", "objects": 2, "correct": 1, "as_other": {}, "missed": 1,
                              "false_positives": 1}  # fmt: skip
    assert rows["star"]["objects"] == 1 and rows["star"]["as_other"] == {"circle": 1}
    assert rows["star"]["correct"] == 0 and rows["star"]["missed"] == 0 and rows["star"]["false_positives"] == 1
    table = confusion_table(list(rows.values()))
    assert "circle" in table.splitlines()[1] and "50%" in table.splitlines()[1]
    assert "circle 1" in table.splitlines()[2]


def test_a_looser_iou_threshold_matches_a_shifted_box():
    detections = [det(2, 1, [4, 0, 10, 10], 0.9)]  # IoU 6*10 / (200 - 60) = 0.43 with image 2's circle
    strict = {r["name"]: r for r in confusion_summary(GT, detections)}["circle"]
    loose = {r["name"]: r for r in confusion_summary(GT, detections, iou_threshold=0.4)}["circle"]
    assert strict["correct"] == 0 and strict["false_positives"] == 1
    assert loose["correct"] == 1 and loose["false_positives"] == 0
