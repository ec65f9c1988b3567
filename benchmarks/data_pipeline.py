"""Images/s of the training input path vs a torch DataLoader doing the same work, on this machine.

    python benchmarks/data_pipeline.py [--profile sample|coco] [--num-images 1200] [--min-size 512]
                                       [--max-size 853] [--batch-size 8] [--rows-per-shard 64]

`--profile coco` generates COCO-shaped images (640 px, ~7 objects; `retina.data.synthetic`) and, unless given,
resizes them as the COCO recipe does (800 / 1333). Besides the ratio it prints images/s per CPU core and the CPU
cores one GPU needs to be fed at 150 and at 280 images/s (the latter: NVIDIA's MLPerf Training RetinaNet rate
per H100).

Both sides produce the same contract batches (retina.data.collate) from the same synthetic JPEGs with the same
training transform (decode → random scale from [min_size] → random flip → normalise → pad to 128):
- the training path (what one Ray Train worker runs): Parquet shards → the data plan (a new shard order per epoch,
  rows permuted within each 64-row chunk) → one Ray task per chunk (read its rows, decode, resize, flip), `--cpus`
  tasks at a time → batches → collate; with train.deterministic on (chunks taken in plan order) and off (taken
  as they finish), to measure the price of determinism;
- torch DataLoader: a map-style Dataset reading the JPEG files, `--cpus` workers (forkserver), shuffle=True.
Each side runs `--epochs` epochs; the table reports the first epoch (which pays for worker start-up), the later
epochs, and all epochs together. Shard preparation is not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retina.data.collate import collate_samples  # noqa: E402
from retina.data.transforms import TrainAugment, decode_image  # noqa: E402


class JpegDataset(torch.utils.data.Dataset):
    """The DataLoader side: one JPEG from disk per item, same decode + transform as the Ray path."""

    def __init__(self, root: Path, annotations: Path, augment: TrainAugment) -> None:
        coco = json.loads(annotations.read_text())
        boxes: dict[int, list] = {i["id"]: [] for i in coco["images"]}
        labels: dict[int, list] = {i["id"]: [] for i in coco["images"]}
        index = {c["id"]: k for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        for a in coco["annotations"]:
            if not a["iscrowd"]:
                x, y, w, h = a["bbox"]
                boxes[a["image_id"]].append([x, y, x + w, y + h])
                labels[a["image_id"]].append(index[a["category_id"]])
        self.items = [
            (root / i["file_name"], i["id"], np.array(boxes[i["id"]], np.float32).reshape(-1, 4), labels[i["id"]])
            for i in coco["images"]
        ]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int):
        path, image_id, boxes, labels = self.items[idx]
        image = decode_image(path.read_bytes(), str(path)).image
        rng = np.random.default_rng()  # fresh entropy per item: workers must not share one stream
        return self.augment(image, boxes, np.asarray(labels, np.int64), image_id, rng)


def _collate(samples):
    return collate_samples(samples)


def _run_epochs(make_iter, epochs: int) -> list[tuple[int, float]]:
    """[(images, seconds)] per epoch."""
    out = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in make_iter():
            n += int(batch["images"].shape[0])
        out.append((n, time.perf_counter() - start))
    return out


def bench_dataloader(root: Path, ann: Path, augment: TrainAugment, args) -> list[tuple[int, float]]:
    loader = torch.utils.data.DataLoader(
        JpegDataset(root, ann, augment),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.cpus,
        multiprocessing_context="forkserver",
        persistent_workers=True,
        collate_fn=_collate,
    )
    return _run_epochs(lambda: iter(loader), args.epochs)


def bench_stream(shards: str, augment: TrainAugment, args, ordered: bool) -> list[tuple[int, float]]:
    """Training's own input path for one rank of one: the run's data plan (a new shard order per epoch, rows
    permuted per chunk) decoded by Ray tasks, `args.cpus` at a time (what `scaling.data_cpus` gives a rank),
    every epoch in one stream; `ordered` = train.deterministic (chunks taken in plan order, not as they finish)."""
    from pipelines.data.datasets import Decode, DecodeCpus, DecodeStream, batches, make_collate_fn
    from pipelines.data.plan import Position, TrainPlan
    from pipelines.data.shards import shard_index

    plan = TrainPlan(shard_index(shards), seed=0, batch=args.batch_size)
    per_epoch = plan.steps_per_epoch(1)
    chunks = list(plan.chunks(0, 1, Position(), per_epoch * args.epochs))
    stream = DecodeStream(chunks, Decode(augment, seed=0, s3_settings=None), DecodeCpus(args.cpus), ordered=ordered)
    return _split_stream(batches(stream, args.batch_size, make_collate_fn()), per_epoch * args.batch_size, args.epochs)


def _split_stream(batches, epoch_images: int, epochs: int) -> list[tuple[int, float]]:
    """[(images, seconds)] per epoch of one stream (the epochs follow each other without a gap)."""
    out, start, n = [], time.perf_counter(), 0
    for batch in batches:
        n += int(batch["images"].shape[0])
        if n >= epoch_images and len(out) < epochs - 1:  # this epoch's last batch
            now = time.perf_counter()
            out.append((n, now - start))
            start, n = now, 0
    out.append((n, time.perf_counter() - start))
    return out


def _rates(epochs: list[tuple[int, float]]) -> tuple[float, float, float]:
    """(first epoch, the epochs after it, all epochs) in images/s. With the epochs streamed, work done during one
    epoch's measurement (decoded chunks waiting to be taken) counts in the next: compare "all epochs"."""
    first = epochs[0][0] / epochs[0][1]
    rest = epochs[1:] or epochs
    overall = sum(n for n, _ in epochs) / sum(s for _, s in epochs)
    return first, sum(n for n, _ in rest) / sum(s for _, s in rest), overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["sample", "coco"], default="sample")
    parser.add_argument("--num-images", type=int, default=1200)
    parser.add_argument("--min-size", type=int, default=None, help="default 512 (sample) / 800 (coco)")
    parser.add_argument("--max-size", type=int, default=None, help="default 853 (sample) / 1333 (coco)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows-per-shard", type=int, default=64, help="as pipelines/data/sample.py prepares")
    parser.add_argument("--cpus", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--workdir", default=None, help="where to put the synthetic data (default: a temp dir)")
    args = parser.parse_args()
    coco = args.profile == "coco"
    args.min_size = args.min_size or (800 if coco else 512)
    args.max_size = args.max_size or (1333 if coco else 853)

    import ray

    from pipelines.data.prepare import prepare
    from retina.data.synthetic import generate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="retina-bench-"))
    ann = generate(work / "raw", args.num_images, seed=0, profile=args.profile, workers=args.cpus)
    augment = TrainAugment([args.min_size], args.max_size, 0.5)
    torch.set_num_threads(1)  # the consumer only normalises and pads; keep the cores for the workers

    dl = bench_dataloader(work / "raw" / "images", ann, augment, args)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepare(ann, work / "raw" / "images", work / "shards", rows_per_shard=args.rows_per_shard, overwrite=True)
    results = {"torch DataLoader": dl}
    for ordered in (True, False):
        name = f"decode tasks, train.deterministic={str(ordered).lower()}"
        results[name] = bench_stream(str(work / "shards"), augment, args, ordered)
    ray.shutdown()

    dl_rate, dl_overall = _rates(dl)[1:]
    sizes = "640 px, COCO-shaped" if coco else "192-320 px"
    print(
        f"\n{args.num_images} synthetic images ({sizes}) → min_size {args.min_size} / max_size {args.max_size}, "
        f"batch {args.batch_size}, {args.cpus} CPUs, {args.epochs} epochs\n"
    )
    print("| input path | first epoch (img/s) | later epochs (img/s) | ratio | all epochs (img/s) | ratio | "
          "img/s per core (all) | cores per GPU at 150 / 280 img/s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, epochs in results.items():
        first, steady, overall = _rates(epochs)
        per_core = overall / args.cpus
        cores = f"{150 / per_core:.0f} / {280 / per_core:.0f}"
        print(f"| {name} | {first:.1f} | {steady:.1f} | {steady / dl_rate:.2f} | {overall:.1f} | "
              f"{overall / dl_overall:.2f} | {per_core:.1f} | {cores} |")  # fmt: skip
    print(
        "\nratios against the torch DataLoader's; 'later epochs' of a stream count decoded chunks that waited, so "
        "compare on 'all epochs'"
    )


if __name__ == "__main__":
    main()
