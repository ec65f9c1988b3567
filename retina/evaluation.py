"""COCO box evaluation with pycocotools: {"AP", "AP50", "AP75", "APs", "APm", "APl"}.

- Ground truth is a COCO dict (e.g. `retina.data.coco.coco_gt_from_rows` / ``pipelines.data.coco_gt_from_shards``);
  ``iscrowd=1`` regions are honoured the COCO way: detections matched to them count neither as true nor false
  positives.
- Zero detections give 0.0 for every metric instead of a crash (pycocotools' ``loadRes([])`` raises IndexError).
- pycocotools reports -1 for a metric with no ground truth at all (e.g. APs when no object is small); we report
  0.0 so that metric logs stay finite, and list the affected names in ``CocoEvalResult.undefined``.
- The COCOeval summary (the usual 12 lines) is captured into ``CocoEvalResult.report`` for logging; the
  progress prints are dropped.
- Two COCOeval backends (`BACKENDS`): pycocotools, and faster-coco-eval (default: the same numbers, faster).
- ``CocoEvalResult.per_class`` holds AP and AP50 per category (as detectron2's per-category table and
  mmdetection's ``classwise`` option report them): one weak class hides in the mean otherwise.
- ``CocoEvalResult.agnostic`` holds the class-agnostic AP and AP50 (COCOeval with ``useCats=0``: a detection
  may match an object of any class). Its gap to the class-aware AP is what classification costs; the rest is
  localisation and recall. Every detection counts, so one object found under two classes has a duplicate.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats

# COCOeval implementations: pycocotools' (Python loops, the reference) and faster-coco-eval's (the same algorithm
# in C++, a drop-in COCO/COCOeval pair). benchmarks/coco_eval.py checks they agree on every metric, per class and
# class-agnostic, and measures both.
BACKENDS = ("pycocotools", "faster_coco_eval")
DEFAULT_BACKEND = "faster_coco_eval"


def _coco_classes(backend: str) -> tuple[Any, Any]:
    """(COCO, COCOeval) of a backend."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster

        # its summary goes to a logger unless told to print: the report is captured from stdout for both backends
        return FastCOCO, functools.partial(COCOeval_faster, print_function=print)
    raise ValueError(f"unknown COCOeval backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class CocoEvalResult:
    metrics: dict[str, float]  # METRICS → value in [0, 1]; 0.0 where undefined
    report: str  # pycocotools' printed summary
    undefined: list[str] = field(default_factory=list)  # metrics pycocotools reported as -1 (no GT in range)
    # COCO category id → {"AP", "AP50"} over all areas, 100 detections; categories without GT are left out
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)
    agnostic: dict[str, float] = field(default_factory=dict)  # {"AP", "AP50"} with every class merged


def _ap_ap50(evaluator: COCOeval, k: int) -> dict[str, float] | None:
    """AP@[.5:.95] and AP50 of category index `k` (area "all", 100 detections) from COCOeval's accumulated
    precision array; None when the category has no ground truth (pycocotools fills -1 there)."""
    # precision: (T iou thresholds, R recalls, K categories, A areas, M max-dets)
    p = evaluator.eval["precision"][:, :, k, 0, -1]
    if not (p > -1).any():
        return None
    p50 = p[0]  # iouThrs[0] = 0.5
    return {"AP": float(p[p > -1].mean()), "AP50": float(p50[p50 > -1].mean())}


def _per_class(evaluator: COCOeval) -> dict[int, dict[str, float]]:
    """AP@[.5:.95] and AP50 per category with ground truth."""
    rows = {int(cat_id): _ap_ap50(evaluator, k) for k, cat_id in enumerate(evaluator.params.catIds)}
    return {cat_id: row for cat_id, row in rows.items() if row is not None}


def _agnostic(coco_gt: Any, coco_dt: Any, evaluator_class: Any) -> dict[str, float]:
    """AP@[.5:.95] and AP50 of a COCOeval that ignores categories (useCats=0), area "all", 100 detections."""
    evaluator = evaluator_class(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.useCats = 0
    evaluator.evaluate()
    evaluator.accumulate()
    return _ap_ap50(evaluator, 0) or {"AP": 0.0, "AP50": 0.0}  # index 0: the one merged "category"


def agnostic_metrics(agnostic: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Flat metric names for a tracker: ``{prefix}agnostic_AP`` and ``{prefix}agnostic_AP50``."""
    return {f"{prefix}agnostic_{k}": float(v) for k, v in agnostic.items()}


def agnostic_line(agnostic: Mapping[str, float], metrics: Mapping[str, float]) -> str:
    """One line for reports: the class-agnostic AP / AP50 next to the class-aware `metrics`."""
    a, m = agnostic, metrics
    if not a:
        return ""
    return (f"  class-agnostic AP {a['AP']:.4f} (class-aware {m['AP']:.4f}), AP50 {a['AP50']:.4f} "
            f"(class-aware {m['AP50']:.4f}): the gap is what classification costs")  # fmt: skip


def per_class_rows(result: CocoEvalResult, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """``{"id", "name", "AP", "AP50"}`` per category with ground truth, by COCO id: the form reports, trackers and
    tables take."""
    return [{"id": c, "name": names.get(c, str(c)), **v} for c, v in sorted(result.per_class.items())]


def per_class_metrics(rows: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, float]:
    """Flat metric names for a tracker: ``{prefix}class_AP/<name>`` and ``{prefix}class_AP50/<name>``."""
    out: dict[str, float] = {}
    for row in rows:
        name = metric_safe(str(row["name"]))
        out[f"{prefix}class_AP/{name}"] = float(row["AP"])
        out[f"{prefix}class_AP50/{name}"] = float(row["AP50"])
    return out


def metric_safe(name: str) -> str:
    """MLflow metric keys take letters, digits, ``_-. /``; anything else in a category name becomes ``_``."""
    return re.sub(r"[^\w\-. ]", "_", name).strip() or "_"


def per_class_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per category: COCO id, name, AP, AP50 (categories without ground truth are not listed)."""
    lines = ["  id  category              AP      AP50"]
    for row in rows:
        lines.append(f"  {row['id']:>3} {str(row['name'])[:20]:<20} {row['AP']:.4f}  {row['AP50']:.4f}")
    return "\n".join(lines)


def _coco_from_dict(gt: Mapping[str, Any], coco_class: Any = COCO) -> Any:
    coco = coco_class()
    dataset = copy.deepcopy(dict(gt))
    dataset.setdefault("info", {})  # loadRes copies it on some pycocotools versions
    dataset.setdefault("licenses", [])
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _check_detections(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> None:
    image_ids = {int(img["id"]) for img in gt["images"]}
    category_ids = {int(c["id"]) for c in gt["categories"]}
    for i, det in enumerate(detections):
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ValueError(f"detection {i}: missing field '{key}'")
        if int(det["image_id"]) not in image_ids:
            raise ValueError(f"detection {i}: image_id {det['image_id']} is not in the ground truth")
        if int(det["category_id"]) not in category_ids:
            raise ValueError(f"detection {i}: category_id {det['category_id']} is not a ground-truth category")
        if len(det["bbox"]) != 4:
            raise ValueError(f"detection {i}: bbox must be [x, y, w, h], got {det['bbox']!r}")


def coco_evaluate(
    gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], backend: str = DEFAULT_BACKEND
) -> CocoEvalResult:
    """Full evaluation: metrics, the printed summary, and which metrics were undefined (`backend`: BACKENDS)."""
    coco_class, evaluator_class = _coco_classes(backend)
    _check_detections(gt, detections)
    if len(detections) == 0:
        with_gt = {int(a["category_id"]) for a in gt["annotations"] if not a.get("iscrowd", 0)}
        per_class = {c: {"AP": 0.0, "AP50": 0.0} for c in sorted(with_gt)}  # what COCOeval lists: non-crowd GT
        zeros = {k: 0.0 for k in METRICS}
        return CocoEvalResult(zeros, "no detections: every metric is 0.0\n", [], per_class, {"AP": 0.0, "AP50": 0.0})
    out = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):  # progress chatter ("creating index...", "DONE (t=...)")
        coco_gt = _coco_from_dict(gt, coco_class)
        results = [
            {
                "image_id": int(d["image_id"]),
                "category_id": int(d["category_id"]),
                "bbox": [float(v) for v in d["bbox"]],
                "score": float(d["score"]),
            }
            for d in detections
        ]
        coco_dt = coco_gt.loadRes(results)
        evaluator = evaluator_class(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        agnostic = _agnostic(coco_gt, coco_dt, evaluator_class)
    with contextlib.redirect_stdout(out):  # the report: the usual 12-line summary alone
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats[: len(METRICS)]]
    undefined = [name for name, s in zip(METRICS, stats, strict=True) if s < 0]
    metrics = {name: (max(s, 0.0) if np.isfinite(s) else 0.0) for name, s in zip(METRICS, stats, strict=True)}
    return CocoEvalResult(metrics, out.getvalue(), undefined, _per_class(evaluator), agnostic)


def evaluate_detections(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """COCO GT dict + COCO results list → {"AP", "AP50", "AP75", "APs", "APm", "APl"} (0.0 where undefined)."""
    return coco_evaluate(gt, detections).metrics


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def boxes_to_original(boxes: Any, image_size: Sequence[int], orig_size: Sequence[int]) -> np.ndarray:
    """(N, 4) xyxy in resized-image pixels → original-image pixels (per-axis ratios, as `resize_boxes` inverted)."""
    b = _as_numpy(boxes).astype(np.float64).reshape(-1, 4)
    ry = float(orig_size[0]) / float(image_size[0])
    rx = float(orig_size[1]) / float(image_size[1])
    return b * np.array([rx, ry, rx, ry])


def detections_to_coco(
    image_ids: Sequence[int],
    predictions: Sequence[Mapping[str, Any]],
    coco_ids: Sequence[int] | Any,
) -> list[dict[str, Any]]:
    """Model outputs → COCO results list.

    `predictions[i]` holds "boxes" (N, 4) xyxy in original-image pixels, "scores" (N,), "labels" (N,) contiguous
    0..K-1, for image `image_ids[i]`. `coco_ids` maps label → COCO category id: a sequence (label i →
    coco_ids[i]) or a `retina.data.coco.LabelMap`.
    """
    ids = list(getattr(coco_ids, "coco_ids", coco_ids))
    results = []
    for image_id, pred in zip(image_ids, predictions, strict=True):
        boxes = _as_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(pred["scores"]).reshape(-1)
        labels = _as_numpy(pred["labels"]).reshape(-1)
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(ids[int(label)]),
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(score),
                }
            )
    return results
