"""How each class's objects were detected: found as itself, found as another class, or missed — the part of the
AP that a per-class table does not show (which classes the model mixes up).

Per image, detections at or above `score_threshold` are matched greedily, highest score first, to the not yet
matched ground-truth object (crowd regions left out) of any class with the highest IoU ≥ `iou_threshold`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """box (4,) xywh vs others (N, 4) xywh → (N,) IoU."""
    x1, y1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
    y2 = np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / np.maximum(box[2] * box[3] + others[:, 2] * others[:, 3] - inter, 1e-9)


def _match_image(objects: list[Mapping], dets: list[Mapping], iou_threshold: float) -> tuple[list, list, list]:
    """One image: (matched (object class, detection class) pairs, the classes of the objects no detection
    matched, the classes of the detections that matched no object)."""
    boxes = np.asarray([o["bbox"] for o in objects], dtype=np.float64).reshape(-1, 4)
    free = np.ones(len(objects), dtype=bool)
    pairs, false_positives = [], []
    for det in sorted(dets, key=lambda d: -d["score"]):
        iou = np.where(free, _iou(np.asarray(det["bbox"], dtype=np.float64), boxes), -1.0) if len(objects) else []
        best = int(np.argmax(iou)) if len(objects) else -1
        if best >= 0 and iou[best] >= iou_threshold:
            free[best] = False
            pairs.append((objects[best]["category_id"], det["category_id"]))
        else:
            false_positives.append(det["category_id"])
    missed = [o["category_id"] for o, f in zip(objects, free, strict=True) if f]
    return pairs, missed, false_positives


def confusion_summary(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> list[dict[str, Any]]:
    """One row per category: {"id", "name", "objects", "correct", "as_other" {name: count}, "missed",
    "false_positives" (its detections that matched no object)}. `gt`: a COCO dict; `detections`: COCO results."""
    names = {int(c["id"]): str(c["name"]) for c in gt["categories"]}
    objects: dict[int, list] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            objects.setdefault(int(a["image_id"]), []).append(a)
    dets: dict[int, list] = {}
    for d in detections:
        if d["score"] >= score_threshold:
            dets.setdefault(int(d["image_id"]), []).append(d)
    rows = {c: {"id": c, "name": n, "objects": 0, "correct": 0, "as_other": {}, "missed": 0, "false_positives": 0}
            for c, n in names.items()}  # fmt: skip
    for image_id in set(objects) | set(dets):
        pairs, missed, false_positives = _match_image(objects.get(image_id, []), dets.get(image_id, []), iou_threshold)
        for true, found in pairs:
            rows[true]["objects"] += 1
            if true == found:
                rows[true]["correct"] += 1
            else:
                other = rows[true]["as_other"]
                other[names[found]] = other.get(names[found], 0) + 1
        for true in missed:
            rows[true]["objects"] += 1
            rows[true]["missed"] += 1
        for found in false_positives:
            rows[found]["false_positives"] += 1
    return [rows[c] for c in sorted(rows)]


def confusion_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as text: per class, objects, found as itself, found as another class (the top two), missed."""
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"  {'class':<{width}}  objects  correct  as another class            missed  false pos."]
    for r in rows:
        n = max(r["objects"], 1)
        others = ", ".join(f"{k} {v}" for k, v in sorted(r["as_other"].items(), key=lambda kv: -kv[1])[:2]) or "-"
        lines.append(f"  {r['name']:<{width}}  {r['objects']:>7}  {r['correct'] / n:>7.0%}  {others:<28}"
                     f"  {r['missed'] / n:>6.0%}  {r['false_positives']:>10}")  # fmt: skip
    return "\n".join(lines)
