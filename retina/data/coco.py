"""Parse and validate COCO detection annotations; build the contiguous label map; rebuild COCO GT from shards.

Policy (the manifest records every repaired or skipped item with its reason):
- structural problems are errors (``DataError`` naming the file, the record and the field): malformed JSON,
  missing required keys, wrong types, unknown image/category ids, duplicate ids, an empty or malformed bbox,
  a ``file_name`` that could escape the image root (``..``, absolute path, URI scheme);
- geometric problems are repaired or skipped and counted: width/height <= 0 → dropped ("degenerate"),
  partly outside the image → clipped ("clipped"), entirely outside → dropped ("outside");
- ``iscrowd=1`` annotations become crowd regions (ignored at evaluation), never training targets;
- images without annotations are kept as pure negatives and counted.

Pure Python/numpy: no ray, mlflow or boto3 here.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, the record (image/annotation id) and the field."""


# ------------------------------------------------------------------------------------------------ label map


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids (sorted ascending) ↔ contiguous labels 0..K-1; label i is ``coco_ids[i]``."""

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.coco_ids)

    def to_label(self, coco_id: int) -> int:
        return self._index[int(coco_id)]

    def to_coco_id(self, label: int) -> int:
        return self.coco_ids[int(label)]

    @functools.cached_property
    def _index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.coco_ids)}

    def to_json(self) -> list[dict[str, Any]]:
        """The manifest / checkpoint form: one entry per class, in label order."""
        return [
            {"id": cid, "name": name, "label": i}
            for i, (cid, name) in enumerate(zip(self.coco_ids, self.names, strict=True))
        ]

    @classmethod
    def from_json(cls, entries: Iterable[Mapping[str, Any]]) -> LabelMap:
        items = sorted(entries, key=lambda e: int(e["label"]))
        if [int(e["label"]) for e in items] != list(range(len(items))):
            raise DataError("label map: labels must be exactly 0..K-1")
        return cls(tuple(int(e["id"]) for e in items), tuple(str(e["name"]) for e in items))

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, Any]]) -> LabelMap:
        """COCO ``categories`` → map; labels follow the sorted COCO ids (the usual detectron2 convention)."""
        items = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in items), tuple(str(c["name"]) for c in items))


# ------------------------------------------------------------------------------------------------ records


@dataclass
class ImageRecord:
    """One image after validation: targets in original-image pixels (the shard row before the image bytes)."""

    image_id: int
    file_name: str  # relative to the image root, validated by `safe_relative_path`
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, inside [0, W] x [0, H], positive width and height
    labels: np.ndarray  # (N,) int32 contiguous labels 0..K-1
    crowd_boxes: np.ndarray  # (C, 4) float32 xyxy iscrowd=1 regions (ignored at evaluation)
    crowd_labels: np.ndarray  # (C,) int32 contiguous labels of the crowd regions (COCOeval ignores per class)

    def to_row(self) -> dict[str, Any]:
        """Shard-schema row without the ``image`` bytes: lists are flattened xyxy (see docs/data.md)."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "height": self.height,
            "width": self.width,
            "boxes": self.boxes.reshape(-1).tolist(),
            "labels": self.labels.tolist(),
            "crowd_boxes": self.crowd_boxes.reshape(-1).tolist(),
            "crowd_labels": self.crowd_labels.tolist(),
        }


@dataclass
class Issue:
    """One repaired or skipped item: `kind` is a stable key (counted in the manifest), `reason` is for people."""

    kind: str
    reason: str
    image_id: int | None = None
    annotation_id: int | None = None
    file_name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ParsedCoco:
    images: list[ImageRecord]  # sorted by image_id
    label_map: LabelMap
    issues: list[Issue] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ paths

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3:, http:, file:, and Windows drive letters (C:)


def safe_relative_path(file_name: Any, where: str) -> str:
    """Return `file_name` as a POSIX relative path that stays under the image root, or raise DataError.

    Rejected: non-strings, empty names, absolute paths, ``..`` segments, URI schemes / drive letters,
    backslashes and NUL bytes (a dataset must not make us read outside the root we were given).
    """
    if not isinstance(file_name, str) or not file_name.strip():
        raise DataError(f"{where}: field 'file_name' must be a non-empty string, got {file_name!r}")
    if "\x00" in file_name or "\\" in file_name:
        raise DataError(f"{where}: file_name {file_name!r} contains a backslash or NUL byte")
    if file_name.startswith("/") or _SCHEME.match(file_name):
        raise DataError(f"{where}: file_name {file_name!r} must be relative to the image root (no '/', no scheme)")
    parts = file_name.split("/")
    if any(p == ".." for p in parts):
        raise DataError(f"{where}: file_name {file_name!r} escapes the image root ('..')")
    return "/".join(p for p in parts if p not in ("", "."))


# ------------------------------------------------------------------------------------------------ parsing


def _require(record: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing required field '{key}'")
    value = record[key]
    # bool is an int subclass; a JSON true/false is never a valid id, size or count here.
    if isinstance(value, bool) or not isinstance(value, types):
        raise DataError(f"{where}: field '{key}' has type {type(value).__name__}, value {value!r}")
    return value


def _record_id(record: Any, where: str, name: str, kind: str) -> tuple[int, str]:
    """A record's integer ``id`` and the new `where` for its remaining checks: ``<name>: <kind> id <id>``.

    Until the id is known, `where` names the record by its position (``<name>: images[3]``); after, by its id,
    which is what a person searches the file for."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object")
    record_id = _require(record, "id", int, where)
    return record_id, f"{name}: {kind} id {record_id}"


def _load(source: bytes | str | Mapping[str, Any], name: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    try:
        data = json.loads(source)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{name}: malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{name}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _check_sections(data: Mapping[str, Any], name: str) -> None:
    # The three COCO sections must all be lists before any record is looked at.
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{name}: missing required top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{name}: '{key}' must be a list, got {type(data[key]).__name__}")


def _parse_categories(entries: list[Any], name: str) -> dict[int, str]:
    """``categories`` → {COCO id: name}; duplicates and an empty list are errors (no classes, no model)."""
    categories: dict[int, str] = {}
    for i, cat in enumerate(entries):
        cid, where = _record_id(cat, f"{name}: categories[{i}]", name, "category")
        cname = _require(cat, "name", str, where)
        if cid in categories:
            raise DataError(f"{where}: duplicate category id")
        categories[cid] = cname
    if not categories:
        raise DataError(f"{name}: 'categories' is empty; at least one class is needed")
    return categories


def _parse_images(entries: list[Any], name: str) -> dict[int, dict[str, Any]]:
    """``images`` → {image id: working record}; the box lists are filled by `_parse_annotations`."""
    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(entries):
        image_id, where = _record_id(img, f"{name}: images[{i}]", name, "image")
        if image_id in images:
            raise DataError(f"{where}: duplicate image id")
        file_name = safe_relative_path(img.get("file_name"), where)
        height = _require(img, "height", int, where)
        width = _require(img, "width", int, where)
        if height <= 0 or width <= 0:
            raise DataError(f"{where}: height/width must be positive, got {height}x{width}")
        images[image_id] = {"file_name": file_name, "height": height, "width": width, "boxes": [], "crowd": []}
    return images


def _require_bbox(ann: Mapping[str, Any], where: str) -> list[Any]:
    bbox = _require(ann, "bbox", list, where)
    # Short-circuit order matters: math.isfinite is only reached for real (non-bool) numbers.
    if len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
    ):
        raise DataError(f"{where}: field 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    return bbox


def _annotation_fields(
    ann: Any, where: str, name: str, images: Mapping[int, Any], categories: Mapping[int, str], seen: set[int]
) -> tuple[int, int, int, int, list[Any]]:
    """Validate one annotation's structure; return (id, image_id, category_id, iscrowd, bbox).

    Checks run in a fixed order so the first structural problem is the one reported.
    """
    ann_id, where = _record_id(ann, where, name, "annotation")
    if ann_id in seen:
        raise DataError(f"{where}: duplicate annotation id")
    seen.add(ann_id)
    image_id = _require(ann, "image_id", int, where)
    where = f"{name}: annotation id {ann_id} (image id {image_id})"
    if image_id not in images:
        raise DataError(f"{where}: field 'image_id' names an unknown image")
    cid = _require(ann, "category_id", int, where)
    if cid not in categories:
        raise DataError(f"{where}: field 'category_id' {cid} is not in 'categories'")
    iscrowd = _require(ann, "iscrowd", int, where)
    if iscrowd not in (0, 1):
        raise DataError(f"{where}: field 'iscrowd' must be 0 or 1, got {iscrowd}")
    area = _require(ann, "area", (int, float), where)
    if not math.isfinite(area):
        raise DataError(f"{where}: field 'area' is not finite: {area!r}")
    return ann_id, image_id, cid, iscrowd, _require_bbox(ann, where)


def _fit_box(
    bbox: list[Any], img: Mapping[str, Any], ref: dict[str, Any], counts: dict[str, int], issues: list[Issue]
) -> tuple[float, float, float, float] | None:
    """xywh → xyxy clipped to the image, or None when dropped; every repair or drop is counted and recorded."""
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        counts["degenerate"] += 1
        issues.append(Issue("degenerate", f"bbox {bbox} has width or height <= 0; dropped", **ref))
        return None
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
    if x2 <= x1 or y2 <= y1:
        counts["outside"] += 1
        size = f"{img['width']}x{img['height']}"
        issues.append(Issue("outside", f"bbox {bbox} lies outside the {size} image; dropped", **ref))
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        counts["clipped"] += 1
        clipped = [round(v, 3) for v in (x1, y1, x2 - x1, y2 - y1)]
        issues.append(Issue("clipped", f"bbox {bbox} clipped to the image: {clipped}", **ref))
    return x1, y1, x2, y2


def _parse_annotations(
    entries: list[Any],
    name: str,
    images: dict[int, dict[str, Any]],
    categories: Mapping[int, str],
    label_map: LabelMap,
    issues: list[Issue],
) -> dict[str, int]:
    """Validate every annotation and append its box (or crowd region) to its image; return the counts."""
    to_label = {cid: i for i, cid in enumerate(label_map.coco_ids)}
    seen_ann: set[int] = set()
    counts = {"annotations": 0, "degenerate": 0, "clipped": 0, "outside": 0, "crowd": 0}
    for i, ann in enumerate(entries):
        where = f"{name}: annotations[{i}]"
        ann_id, image_id, cid, iscrowd, bbox = _annotation_fields(ann, where, name, images, categories, seen_ann)
        counts["annotations"] += 1
        img = images[image_id]
        ref = {"image_id": image_id, "annotation_id": ann_id, "file_name": img["file_name"]}
        box = _fit_box(bbox, img, ref, counts, issues)
        if box is None:
            continue
        target = (*box, to_label[cid])
        if iscrowd:
            counts["crowd"] += 1
            img["crowd"].append(target)
        else:
            img["boxes"].append(target)
    return counts


def _build_records(images: dict[int, dict[str, Any]], counts: dict[str, int]) -> list[ImageRecord]:
    """Working records → ImageRecords sorted by image id; adds the per-image counts to `counts`."""
    records = []
    counts.update(images=len(images), images_without_annotations=0, images_only_crowd=0)
    for image_id in sorted(images):
        img = images[image_id]
        if not img["boxes"]:
            # Kept as pure negatives (focal loss normalises by max(num_fg, 1)); counted for the manifest.
            key = "images_only_crowd" if img["crowd"] else "images_without_annotations"
            counts[key] += 1
        boxes = np.asarray([t[:4] for t in img["boxes"]], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray([t[4] for t in img["boxes"]], dtype=np.int32)
        crowd = np.asarray([t[:4] for t in img["crowd"]], dtype=np.float32).reshape(-1, 4)
        crowd_labels = np.asarray([t[4] for t in img["crowd"]], dtype=np.int32)
        records.append(
            ImageRecord(image_id, img["file_name"], img["height"], img["width"], boxes, labels, crowd, crowd_labels)
        )
    return records


def parse_coco(source: bytes | str | Mapping[str, Any], name: str = "annotations") -> ParsedCoco:
    """Validate a COCO detection file (bytes, text or dict) and return per-image targets.

    `name` is the file's path as the user gave it; every error message starts with it.
    """
    data = _load(source, name)
    _check_sections(data, name)
    # Categories first: images and annotations are checked against them.
    categories = _parse_categories(data["categories"], name)
    label_map = LabelMap.from_categories([{"id": k, "name": v} for k, v in categories.items()])
    images = _parse_images(data["images"], name)
    issues: list[Issue] = []
    counts = _parse_annotations(data["annotations"], name, images, categories, label_map, issues)
    records = _build_records(images, counts)
    return ParsedCoco(records, label_map, issues, counts)


# ------------------------------------------------------------------------------------------------ reverse


def _xyxy_to_xywh(flat: Any) -> list[list[float]]:
    b = np.asarray(flat if flat is not None else [], dtype=np.float64).reshape(-1, 4)
    return [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in b]


def coco_gt_from_rows(rows: Iterable[Mapping[str, Any]], label_map: LabelMap) -> dict[str, Any]:
    """Shard rows (image bytes not needed) → a COCO ground-truth dict for pycocotools.

    Boxes come back in xywh with ``area = w * h`` (the shards keep boxes, not masks), categories with their
    original COCO ids, crowd regions with ``iscrowd=1``. Annotation ids are renumbered 1..N in image order.
    """
    images, annotations = [], []
    for row in sorted(rows, key=lambda r: int(r["image_id"])):
        image_id = int(row["image_id"])
        images.append(
            {
                "id": image_id,
                "file_name": str(row["file_name"]),
                "height": int(row["height"]),
                "width": int(row["width"]),
            }
        )
        groups = [
            (row.get("boxes"), row.get("labels"), 0),
            (row.get("crowd_boxes"), row.get("crowd_labels"), 1),
        ]
        for boxes, labels, iscrowd in groups:
            xywh = _xyxy_to_xywh(boxes)
            labels = [] if labels is None else list(labels)
            if len(labels) != len(xywh):
                raise DataError(f"shard row image id {image_id}: {len(xywh)} boxes but {len(labels)} labels")
            for box, label in zip(xywh, labels, strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label_map.to_coco_id(int(label)),
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": iscrowd,
                    }
                )
    categories = [{"id": cid, "name": n} for cid, n in zip(label_map.coco_ids, label_map.names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}
