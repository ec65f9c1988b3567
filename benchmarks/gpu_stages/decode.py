"""Stage 5: the input decode + resize rate at COCO sizes on every CPU of the machine, and so the CPU cores one
GPU needs to be fed at the training-step rate of stage 3.

Each worker process (one per CPU, one torch thread each) reads a JPEG file, decodes it (retina.data.transforms:
EXIF, colour modes) and applies the training transform (shorter side 800, longer at most 1333, random flip),
which is the per-image CPU work of the Ray Data decode tasks. Normalising and padding (the collate) run in the
training process and are not counted; nor is moving the pixels between processes (only the size comes back).
The JPEGs are photo-like (smooth colour fields plus sensor-like noise) at COCO's common sizes, ~640×480.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gpu_stages.common import Context, cpu_count, log, require
from retina.data.transforms import TrainAugment, decode_image

STAGE = "5 decode"
COCO_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (512, 640), (480, 640))  # (H, W), COCO's commonest
_AUGMENT = TrainAugment([800], 1333, 0.5)
_NO_BOXES, _NO_LABELS = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photo-like JPEGs (quality 90) at COCO sizes."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = COCO_SIZES[i % len(COCO_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend


def decode_resize(path: str) -> tuple[int, int]:
    """One image's CPU work; returns the resized (h, w)."""
    image = decode_image(Path(path).read_bytes(), path).image
    rng = np.random.default_rng()
    sample = _AUGMENT(image, _NO_BOXES, _NO_LABELS, 0, rng)
    return sample.image_size


def measure(paths: list[Path], workers: int, tasks: int) -> float:
    """Images per second over `tasks` decodes spread on `workers` processes (after a warm-up round)."""
    jobs = [str(paths[i % len(paths)]) for i in range(tasks)]
    # spawn: the parent may hold a CUDA context, which a fork must not inherit
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        pool.map(decode_resize, jobs[: 2 * workers], chunksize=1)  # start-up and imports, not timed
        t0 = time.perf_counter()
        sizes = pool.map(decode_resize, jobs, chunksize=4)
        seconds = time.perf_counter() - t0
    require(all(min(s) == 800 or max(s) == 1333 for s in sizes), "the training transform did not resize to 800/1333")
    return tasks / seconds


def run(ctx: Context) -> None:
    workers = 1 if ctx.dry_run else cpu_count()
    tasks = 8 * workers if ctx.dry_run else 100 * workers
    with tempfile.TemporaryDirectory(prefix="gpu-check-jpeg-") as tmp:
        paths = make_jpegs(Path(tmp), 8 if ctx.dry_run else 48)
        kib = np.mean([p.stat().st_size for p in paths]) / 1024
        log(f"{STAGE}: {tasks} decodes of {len(paths)} JPEGs (~{kib:.0f} KiB) on {workers} processes")
        rate = measure(paths, workers, tasks)
    r = ctx.report
    r.info(STAGE, f"decode+resize to 800/1333, {workers} worker process(es), JPEG ~{kib:.0f} KiB", rate, "img/s")
    r.info(STAGE, "per core", rate / workers, "img/s")
    r.values["decode_img_s_per_core"] = rate / workers


def cores_per_gpu(ctx: Context) -> None:
    """After stage 3: the cores whose decode rate matches one GPU's training rate (a row, when both ran)."""
    per_core, train = ctx.report.values.get("decode_img_s_per_core"), ctx.report.values.get("train_img_s")
    if per_core and train:
        ctx.report.info(STAGE, "CPU cores per GPU (stage 3 img/s / per-core rate)", train / per_core)
