"""Training throughput (images/s) of the real pipeline with 1 Ray Train worker vs N DDP workers, same machine.

    python benchmarks/train_scaling.py [--config configs/demo.yaml] [--steps 40] [--workers 1 2] [--gpu]

Each row is a full training run (`pipelines.training.run.run_training`, what `pipelines/train.py` calls: Ray
Data ingest, DDP over gloo or NCCL, the per-step flag all-reduce) of `--steps` steps with the config's global
batch, into a throwaway MLflow store and run folder.
The figure is the median of the logged ``train/images_per_s`` windows after the first (which holds start-up:
worker processes, the first Ray Data execution). On CPU the workers share the machine's cores: 1 worker gets
all of them as torch threads, N workers get cores/N each, so the ratio shows what DDP over processes costs or
gains against intra-op threading on the same hardware. ``--gpu`` adds rows with one GPU per worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from pipelines.config import load_config
from pipelines.names import TRAIN_IMAGES_PER_S
from pipelines.tracking.store import metric_history
from pipelines.training.run import run_training


def measure(config: str, steps: int, workers: int, cpus: float, gpu: bool, work: Path) -> float:
    name = f"scaling_{'gpu' if gpu else 'cpu'}_{workers}w"
    cfg = load_config(
        config,
        [
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={cpus}",
            f"scaling.use_gpu={str(gpu).lower()}",
            f"train.max_steps={steps}",
            "train.log_every=5",
            "train.eval_every_epochs=1000",  # one evaluation, at the end; not part of the figure
            "train.num_logged_images=0",
            "train.warmup_iters=0",
            f"run.name={name}",
            f"run.storage_path={work}/runs",
            f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            "tracking.experiment=train-scaling",
            "tracking.alias=",
        ],
    )
    outcome = run_training(cfg)
    history = metric_history(outcome.tracking_uri, outcome.mlflow_run_id, TRAIN_IMAGES_PER_S)
    values = [v for _, v in history[1:]] or [v for _, v in history]
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpu", action="store_true", help="also measure with one GPU per worker")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        for gpu in [False, True] if args.gpu else [False]:
            for n in args.workers:
                cpus = max(1, cores // n) if not gpu else 1
                rows.append((gpu, n, cpus, measure(args.config, args.steps, n, cpus, gpu, Path(tmp))))
    print(f"\ntraining throughput, {args.config}, {args.steps} steps, {cores} CPU cores\n")
    print("| device | workers | CPUs per worker | images/s | vs 1 worker |")
    print("| --- | --- | --- | --- | --- |")
    for gpu, n, cpus, ips in rows:
        base = next((r[3] for r in rows if r[0] == gpu and r[1] == 1), None)
        ratio = f"{ips / base:.2f}x" if base else "-"
        print(f"| {'GPU' if gpu else 'CPU'} | {n} | {cpus} | {ips:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
