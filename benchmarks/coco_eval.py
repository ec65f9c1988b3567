"""What one COCO-scale evaluation costs, and what it stalls: pycocotools vs faster-coco-eval, sync vs background.

    python benchmarks/coco_eval.py [--images 5000] [--classes 80] [--detections 100] [--seed 0]

The workload is COCO val2017's shape, generated in memory: `--images` images with a geometric number of objects
(mean 7.3, COCO's), `--classes` categories with COCO's ids and a Zipf-like frequency, boxes log-uniform from 8 px
to 60 % of a 640x480 image (~1 % crowd regions); `--detections` detections per image: a jittered copy of most
objects (sometimes under another class) plus low-scored false positives up to the cap (COCO's maxDets).

It times, in this one process:
1. the whole evaluation a run does after its inference (`retina.evaluation.coco_evaluate`: the class-aware
   COCOeval with its report, per-class AP, the class-agnostic COCOeval), with each COCOeval backend, and checks
   that they give the same metrics (every metric, per class and agnostic, to 1e-9);
2. the training stall per evaluation: today's synchronous path (rank 0 converts and evaluates while the other
   ranks wait at the report) against the background path training uses (`pipelines.training.background_eval`:
   rank 0 hands the raw predictions to a Ray task and goes on training; the stall is the hand-over).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from retina.data.synthetic import COCO_IDS


def make_workload(images: int, classes: int, detections: int, seed: int) -> tuple[dict, list[int], list[dict]]:
    """(COCO ground-truth dict, image ids, predictions as the evaluation gathers them: per image "boxes" (N, 4)
    xyxy float32 in original pixels, "scores" (N,), "labels" (N,) contiguous)."""
    rng = np.random.default_rng(seed)
    cat_ids = list(COCO_IDS[:classes]) if classes <= len(COCO_IDS) else list(range(1, classes + 1))
    freq = 1.0 / np.arange(1, classes + 1) ** 0.8
    freq /= freq.sum()
    gt_images, annotations, predictions = [], [], []
    for image_id in range(1, images + 1):
        h, w = 480, 640
        gt_images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h, "width": w})
        n = min(int(rng.geometric(1 / 7.3)), 50)
        sizes = np.exp(rng.uniform(np.log(8), np.log(0.6 * h), size=(n, 2)))  # (n, 2) w, h
        xy = rng.uniform(0, 1, size=(n, 2)) * (np.array([w, h]) - sizes)
        labels = rng.choice(classes, size=n, p=freq)
        crowd = rng.random(n) < 0.01
        for (x, y), (bw, bh), label, c in zip(xy, sizes, labels, crowd, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[label],
                                "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh),
                                "iscrowd": int(c)})  # fmt: skip
        found = rng.random(n) < 0.8
        gt_xyxy = np.concatenate([xy, xy + sizes], 1)[found]
        jitter = rng.normal(0, 0.08, size=gt_xyxy.shape) * np.repeat(sizes[found], 2, axis=1)
        tp_labels = np.where(rng.random(found.sum()) < 0.85, labels[found], rng.integers(0, classes, found.sum()))
        k = max(0, detections - len(gt_xyxy))
        fp_wh = np.exp(rng.uniform(np.log(8), np.log(0.6 * h), size=(k, 2)))
        fp_xy = rng.uniform(0, 1, size=(k, 2)) * (np.array([w, h]) - fp_wh)
        boxes = np.concatenate([gt_xyxy + jitter, np.concatenate([fp_xy, fp_xy + fp_wh], 1)])[:detections]
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(gt_xyxy)), rng.uniform(0.0, 0.4, k)])[:detections]
        det_labels = np.concatenate([tp_labels, rng.integers(0, classes, k)])[:detections]
        predictions.append(
            {"boxes": boxes.astype(np.float32), "scores": scores.astype(np.float32), "labels": det_labels}
        )
    categories = [{"id": c, "name": f"class_{c}"} for c in cat_ids]
    gt = {"images": gt_images, "annotations": annotations, "categories": categories}
    return gt, list(range(1, images + 1)), predictions


def _same(a, b) -> float:
    """Largest absolute difference between two CocoEvalResults' metrics, per-class and agnostic numbers."""
    diffs = [abs(a.metrics[k] - b.metrics[k]) for k in a.metrics]
    diffs += [abs(a.per_class[c][m] - b.per_class[c][m]) for c in a.per_class for m in ("AP", "AP50")]
    diffs += [abs(a.agnostic[m] - b.agnostic[m]) for m in a.agnostic]
    if set(a.per_class) != set(b.per_class):
        return float("inf")
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from pipelines.training.background_eval import BackgroundEvaluator
    from pipelines.training.evaluation import Predictions
    from retina import evaluation

    gt, image_ids, predictions = make_workload(args.images, args.classes, args.detections, args.seed)
    coco_ids = [c["id"] for c in gt["categories"]]
    num_dets = sum(len(p["scores"]) for p in predictions)
    print(f"{args.images} images, {len(gt['annotations'])} objects, {args.classes} classes, {num_dets} detections")

    timings, results = {}, {}
    for backend in evaluation.BACKENDS:
        start = time.perf_counter()
        detections = evaluation.detections_to_coco(image_ids, predictions, coco_ids)
        convert = time.perf_counter() - start
        results[backend] = evaluation.coco_evaluate(gt, detections, backend=backend)
        timings[backend] = (convert, time.perf_counter() - start)
        print(f"  {backend}: {timings[backend][1]:.1f} s (of which converting to COCO results {convert:.1f} s), "
              f"AP {results[backend].metrics['AP']:.4f}", flush=True)  # fmt: skip
    backends = list(evaluation.BACKENDS)
    diff = _same(results[backends[0]], results[backends[-1]])

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    evaluator = BackgroundEvaluator(gt, coco_ids, backend=evaluation.DEFAULT_BACKEND)
    start = time.perf_counter()
    evaluator.submit(step=1, predictions=Predictions(image_ids, predictions), extra=None)
    stall = time.perf_counter() - start
    finished = evaluator.wait()
    ready = time.perf_counter() - start
    ray.shutdown()
    assert abs(finished.result.coco.metrics["AP"] - results[evaluation.DEFAULT_BACKEND].metrics["AP"]) < 1e-12

    sync = timings["pycocotools"][1]
    print()
    print("| evaluation path | seconds | ratio vs pycocotools (sync) |")
    print("| --- | ---: | ---: |")
    for backend, (_, seconds) in timings.items():
        print(f"| synchronous, {backend} | {seconds:.1f} | {seconds / sync:.3f} |")
    print(f"| background Ray task ({evaluation.DEFAULT_BACKEND}): result ready after | {ready:.1f} | "
          f"{ready / sync:.3f} |")  # fmt: skip
    print(f"| background Ray task: training stall (hand-over) | {stall:.2f} | {stall / sync:.3f} |")
    print(f"\nlargest metric difference between the backends: {diff:.2e}")


if __name__ == "__main__":
    main()
