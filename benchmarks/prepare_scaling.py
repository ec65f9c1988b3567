"""How `prepare_data` grows with the dataset: throughput and peak memory at 1k, 5k and 20k COCO-shaped images.

    python benchmarks/prepare_scaling.py [--sizes 1000 5000 20000] [--cpus 2] [--workdir DIR]

Generates the largest size once with the ``coco`` profile of `retina.data.synthetic` (640 px JPEGs, ~7.3 objects
per image, COCO's 80 category ids; not timed), writes one annotation file per size holding the first N images, then
(after one untimed warm-up preparation: Ray starts its worker processes) prepares each size into Parquet shards
(`pipelines.data.prepare.prepare`, 512 rows per shard, the CLI's default) on a local Ray with `--cpus` CPUs. Peak
memory is sampled every 0.2 s as the proportional set size (PSS: shared pages counted once, split between their
users) summed over this process and every process under it (Ray's raylet, object store and workers). Printed per
size: seconds, images/s, peak memory, and the ratios against the smallest size: seconds per image (1.0 = linear
growth) and peak memory (1.0 = flat).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil


class PeakMemory:
    """Largest PSS sum over this process tree seen by a sampling thread while in the `with` block."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def subset(annotations: Path, n: int) -> Path:
    """An annotation file holding the first `n` images of `annotations` and their objects."""
    coco = json.loads(annotations.read_text())
    images = coco["images"][:n]
    keep = {img["id"] for img in images}
    out = annotations.with_name(f"annotations_{n}.json")
    out.write_text(json.dumps({**coco, "images": images,
                               "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keeps the generated images between runs")
    args = parser.parse_args()

    import ray

    from pipelines.data.prepare import prepare
    from retina.data.synthetic import generate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="retina-prepare-bench-"))
    largest = max(args.sizes)
    annotations = work / "raw" / "annotations.json"
    if not annotations.exists() or len(json.loads(annotations.read_text())["images"]) < largest:
        start = time.perf_counter()
        generate(work / "raw", largest, seed=0, profile="coco", workers=args.cpus)
        print(f"generated {largest} COCO-shaped images in {time.perf_counter() - start:.0f} s (not timed below)")

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # untimed: Ray's first tasks start worker processes (imports), a one-off cost that is not per image
    prepare(str(subset(annotations, 20)), str(work / "raw" / "images"), str(work / "shards_warmup"), overwrite=True)
    rows = []
    for n in sorted(args.sizes):
        ann = subset(annotations, n)
        with PeakMemory() as memory:
            start = time.perf_counter()
            prepare(str(ann), str(work / "raw" / "images"), str(work / f"shards_{n}"), overwrite=True)
            seconds = time.perf_counter() - start
        rows.append((n, seconds, memory.peak))
        print(f"{n} images: {seconds:.1f} s", flush=True)
    ray.shutdown()

    n0, s0, m0 = rows[0]
    print(f"\nprepare_data on {args.cpus} CPUs, COCO-shaped 640 px JPEGs\n")
    print("| images | seconds | images/s | peak memory (GB, PSS) | s per image vs smallest | peak memory vs smallest |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, seconds, peak in rows:
        print(f"| {n} | {seconds:.1f} | {n / seconds:.0f} | {peak / 1e9:.2f} | {(seconds / n) / (s0 / n0):.2f} | "
              f"{peak / m0:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
