"""Batch inference over a folder of images with Ray Data: the library behind ``python pipelines/predict.py`` (its
--help lists the outputs).

How it runs: the driver only lists file names; Ray tasks read the bytes, decode and resize each image (a file
that fails is marked, not raised, so the other images of its block survive); a pool of actors, each holding
the model once (on a GPU when the cluster has them), predicts batches; the driver streams the small results
into the JSON files. Image ids are 1..N in sorted file-name order. Decoding, resizing and predicting are the
prediction core's (`retina.inference`), the same steps as `load_model(...).predict` and the MLflow pyfunc model.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import ray

from cluster import s3
from cluster.connect import connect_ray
from pipelines import console
from pipelines.inference.detector import load_model
from pipelines.inference.loading import ModelSource, resolve_model
from retina.data.coco import LabelMap
from retina.data.transforms import decode_image
from retina.inference.images import Prepared, prepare_encoded

logger = logging.getLogger("retina.predict")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class PredictSummary:
    num_files: int  # image files listed
    num_images: int  # images predicted
    num_detections: int
    skipped: list[dict[str, str]]  # [{"file_name", "error"}]
    output: str
    model: str
    score_threshold: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "num_skipped": len(self.skipped)}


# ------------------------------------------------------------------------------------------------ listing


def list_images(root: str, settings: s3.S3Settings | None = None) -> list[tuple[str, str]]:
    """(full path, name relative to `root`) of every image file under `root`, sorted by name."""
    root = str(root)
    if not s3.is_s3(root) and not Path(root).is_dir():
        raise FileNotFoundError(f"--images {root}: no such directory")
    base = root.rstrip("/") + "/" if s3.is_s3(root) else str(Path(root).absolute())
    files = []
    for path in s3.list_files(root if s3.is_s3(root) else base, settings):
        rel = path[len(base) :] if s3.is_s3(root) else os.path.relpath(path, base)
        if rel.lower().endswith(IMAGE_EXTENSIONS) and not Path(rel).name.startswith("."):
            files.append((path, rel.replace(os.sep, "/")))
    return sorted(files, key=lambda f: f[1])


# ------------------------------------------------------------------------------------------------ Ray stages


def decode_rows(batch: dict[str, np.ndarray], *, settings, min_size: int, max_size: int, keep_bytes: bool):
    """map_batches task: read + decode + resize each file. A failure marks its row (``error``); it never raises,
    so one bad file cannot take its block's other images with it ."""
    from retina.config import InputConfig

    input_cfg = InputConfig(min_size=min_size, max_size=max_size)
    out: dict[str, list[Any]] = {
        k: [] for k in ("image_id", "file_name", "error", "image", "image_size", "orig_size", "data")
    }
    for i in range(len(batch["image_id"])):
        path, name = str(batch["path"][i]), str(batch["file_name"][i])
        image, size, orig, error, data = np.zeros((1, 1, 3), np.uint8), (1, 1), (0, 0), "", b""
        try:
            data = s3.read_bytes(path, settings)
            p = prepare_encoded(data, name, input_cfg)
            image, size, orig = p.image, p.image_size, p.orig_size
        except Exception as exc:  # unreadable or undecodable: counted and listed by the driver
            error = f"{type(exc).__name__}: {exc}"
        out["image_id"].append(int(batch["image_id"][i]))
        out["file_name"].append(name)
        out["error"].append(error)
        out["image"].append(image)
        out["image_size"].append(np.asarray(size, np.int64))
        out["orig_size"].append(np.asarray(orig, np.int64))
        out["data"].append(data if keep_bytes and not error else b"")
    return {
        "image_id": np.asarray(out["image_id"], np.int64),
        "file_name": np.asarray(out["file_name"], dtype=object),
        "error": np.asarray(out["error"], dtype=object),
        "image": out["image"],  # ragged (h, w, 3) uint8
        "image_size": np.stack(out["image_size"]),
        "orig_size": np.stack(out["orig_size"]),
        "data": np.asarray(out["data"], dtype=object),
    }


class PredictActor:
    """map_batches actor: loads the model once, predicts whole batches, optionally renders and writes images."""

    def __init__(
        self,
        source: ModelSource,
        score_threshold: float | None,
        render_root: str | None,
        settings: s3.S3Settings | None,
        device: str | None = None,
    ):
        import torch

        if device != "cuda" and not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.detector = load_model(source, device=device, score_threshold=score_threshold, s3_settings=settings)
        self.render_root = render_root
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        items = [  # None for a row whose file could not be read or decoded: the core skips it
            None
            if batch["error"][i]
            else Prepared(np.asarray(batch["image"][i]), tuple(batch["image_size"][i]), tuple(batch["orig_size"][i]))
            for i in range(n)
        ]
        dets = self.detector.predictor.predict(items, batch_size=n)  # the Ray batch is the model's batch
        detections, rendered = [], []
        for i in range(n):
            det = dets[i]
            detections.append(json.dumps(_coco_results(int(batch["image_id"][i]), det)) if det else "[]")
            path = ""
            if det is not None and self.render_root is not None:
                path = self._render(str(batch["file_name"][i]), bytes(batch["data"][i]), det)
            rendered.append(path)
        return {
            "image_id": batch["image_id"],
            "file_name": batch["file_name"],
            "error": batch["error"],
            "height": batch["orig_size"][:, 0],
            "width": batch["orig_size"][:, 1],
            "detections": np.asarray(detections, dtype=object),
            "rendered": np.asarray(rendered, dtype=object),
        }

    def _render(self, file_name: str, data: bytes, det: dict[str, Any]) -> str:
        from PIL import Image

        image = Image.fromarray(decode_image(data, file_name).image)  # same orientation as the boxes
        draw_detections(image, det)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(
            Path(file_name).suffix.lower(), "PNG"
        )
        name = file_name if fmt != "PNG" or file_name.lower().endswith(".png") else f"{file_name}.png"
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        target = s3.join(self.render_root, name)
        s3.write_bytes(target, buf.getvalue(), self.settings)
        return target


def _coco_results(image_id: int, det: dict[str, Any]) -> list[dict[str, Any]]:
    """One image's detections as COCO results entries (xywh, original category ids)."""
    out = []
    for (x1, y1, x2, y2), score, cid in zip(
        det["boxes"].tolist(), det["scores"].tolist(), det["category_ids"].tolist(), strict=True
    ):
        out.append({"image_id": image_id, "category_id": int(cid), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def draw_detections(image: Any, det: dict[str, Any]) -> None:
    """Draw boxes with "name score" labels onto a PIL image in place (colour per class)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 200))
    for box, score, label, name in zip(
        det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), det["names"], strict=True
    ):
        colour = _COLOURS[int(label) % len(_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text)
        y = max(0.0, box[1] - (bottom - top) - 2)
        draw.rectangle((box[0], y, box[0] + (right - left) + 2, y + (bottom - top) + 2), fill=colour)
        draw.text((box[0] + 1, y), text, fill=(0, 0, 0))


# ------------------------------------------------------------------------------------------------ driver


def _compute(num_actors: int | None, device: str | None) -> tuple[dict[str, Any], str | None]:
    """map_batches resources: one GPU per actor when the cluster has GPUs (unless --device cpu), else CPU."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus > 0 and device != "cpu":
        n = num_actors or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=n), "num_gpus": 1}, "cuda"
    return {"compute": ray.data.ActorPoolStrategy(size=num_actors or 1), "num_cpus": 1}, "cpu"


def build_pipeline(
    files: list[tuple[str, str]],
    source: ModelSource,
    *,
    min_size: int,
    max_size: int,
    score_threshold: float | None,
    render_root: str | None,
    batch_size: int,
    num_actors: int | None,
    device: str | None,
) -> ray.data.Dataset:
    """files → Dataset of per-image result rows (lazy: nothing runs until the driver iterates it)."""
    settings = s3.S3Settings.from_env()
    items = [{"image_id": i + 1, "path": p, "file_name": n} for i, (p, n) in enumerate(files)]
    # Small read blocks keep decode tasks parallel and memory flat however many images there are.
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch_size, 1000)))
    ds = ds.map_batches(
        decode_rows,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={
            "settings": settings,
            "min_size": min_size,
            "max_size": max_size,
            "keep_bytes": render_root is not None,
        },
    )
    resources, actor_device = _compute(num_actors, device)
    return ds.map_batches(
        PredictActor,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "source": source,
            "score_threshold": score_threshold,
            "render_root": render_root,
            "settings": settings,
            "device": device or actor_device,
        },
        **resources,
    )


def _write_file(target: str, local: Path) -> None:
    s3.write_bytes(target, local.read_bytes())


def _stream_detections(
    rows: Iterator[dict[str, Any]], det_file: TextIO
) -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    """Write every detection into `det_file` as one JSON list while the rows arrive; return the image rows and the
    skipped files (both sorted) and the number of detections.

    Streamed entry by entry so the driver never holds all detections of a large folder in memory.
    """
    image_rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    num_detections = 0
    det_file.write("[")
    first = True
    for row in rows:
        if row["error"]:
            skipped.append({"file_name": row["file_name"], "error": row["error"]})
            continue
        image_rows.append(
            {
                "id": row["image_id"],
                "file_name": row["file_name"],
                "height": row["height"],
                "width": row["width"],
            }
        )
        for entry in json.loads(row["detections"]):
            det_file.write(("" if first else ",\n") + json.dumps(entry))
            first = False
            num_detections += 1
    det_file.write("]\n")
    # Rows arrive in completion order; the outputs are ordered (image ids, file names) for reproducible files.
    image_rows.sort(key=lambda r: r["id"])
    skipped.sort(key=lambda r: r["file_name"])
    return image_rows, skipped, num_detections


def _write_outputs(
    output: str, det_path: Path, summary: PredictSummary, image_rows: list[dict[str, Any]], label_map: LabelMap
) -> None:
    """The four output files under `output` (local or s3://); detections.json is copied from its local temp file."""
    categories = [{"id": i, "name": n} for i, n in zip(label_map.coco_ids, label_map.names, strict=True)]
    _write_file(s3.join(output, "detections.json"), det_path)
    s3.write_bytes(
        s3.join(output, "images.json"),
        json.dumps({"images": image_rows, "categories": categories}, indent=1).encode(),
    )
    s3.write_bytes(s3.join(output, "skipped.json"), json.dumps(summary.skipped, indent=1).encode())
    s3.write_bytes(s3.join(output, "summary.json"), json.dumps(summary.to_json(), indent=1).encode())


def predict(
    model: str,
    images: str,
    output: str,
    *,
    score_threshold: float | None = None,
    render: bool = False,
    batch_size: int = 8,
    num_actors: int | None = None,
    device: str | None = None,
    tracking_uri: str | None = None,
) -> PredictSummary:
    """Run batch inference and write the outputs (see module docstring); returns the summary."""
    started = time.time()
    source = resolve_model(model, tracking_uri)  # a bad URI fails here, before Ray starts any work
    if not s3.is_s3(output):
        output = str(Path(output).absolute())
    settings = s3.S3Settings.from_env() if s3.is_s3(images) else None
    files = list_images(images, settings)
    connect_ray(dashboard=False, log_to_driver=console.is_verbose())  # Ray Data needs no dashboard
    # The driver needs the label map and input sizes (one small load); actors load their own copies.
    detector = load_model(source, device="cpu", score_threshold=score_threshold)
    ds = build_pipeline(
        files,
        source,
        min_size=detector.cfg.input.min_size,
        max_size=detector.cfg.input.max_size,
        score_threshold=score_threshold,
        render_root=s3.join(output, "rendered") if render else None,
        batch_size=batch_size,
        num_actors=num_actors,
        device=device,
    )
    with tempfile.TemporaryDirectory() as tmp:
        det_path = Path(tmp, "detections.json")
        with det_path.open("w") as det_file:
            image_rows, skipped, num_detections = _stream_detections(_rows(ds, files), det_file)
        summary = PredictSummary(
            len(files),
            len(image_rows),
            num_detections,
            skipped,
            output,
            source.describe(),
            detector.score_threshold,
            time.time() - started,
        )
        _write_outputs(output, det_path, summary, image_rows, detector.label_map)
    return summary


def _rows(ds: ray.data.Dataset, files: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    if not files:
        return
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for i in range(len(batch["image_id"])):
            yield {
                "image_id": int(batch["image_id"][i]),
                "file_name": str(batch["file_name"][i]),
                "error": str(batch["error"][i]),
                "height": int(batch["height"][i]),
                "width": int(batch["width"][i]),
                "detections": str(batch["detections"][i]),
            }


# ------------------------------------------------------------------------------------------------ CLI


def format_summary(s: PredictSummary) -> str:
    lines = [
        f"predicted {s.num_images} of {s.num_files} images in {s.seconds:.0f} s: {s.num_detections} detections "
        f"(score >= {s.score_threshold:g}), {len(s.skipped)} skipped",
        f"  model:  {s.model}",
        f"  output: {s.output} (detections.json, images.json, skipped.json, summary.json)",
    ]
    for item in s.skipped[:20]:
        lines.append(f"  skipped {item['file_name']}: {item['error']}")
    if len(s.skipped) > 20:
        lines.append(f"  ... {len(s.skipped) - 20} more in skipped.json")
    return "\n".join(lines)
