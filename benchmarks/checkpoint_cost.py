"""What a COCO-recipe checkpoint costs and how long it holds the ranks: local disk vs S3, synchronous vs async upload.

    python benchmarks/checkpoint_cost.py [--config configs/coco_r50_1x.yaml] [--workers 2]

The checkpoint is the COCO recipe's: a ResNet-50 RetinaNet with 80 classes (random weights; the size is what
matters) and its SGD momentum state after one step, written by `pipelines.training.reporting` exactly as training
writes it. A 2-worker TorchTrainer on a local Ray reports it through `ray.train.report`, with the run's storage on
local disk and on a moto S3 server on 127.0.0.1 (started here), once with Ray's synchronous upload and once with
the asynchronous one (run.async_upload, the default). Printed per case: the seconds rank 0 spent in the report
(its local write, plus the upload when synchronous) and the seconds the other rank waited at the same report
(the stall a checkpoint causes on ranks that write nothing), with the ratio async / sync.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _train_func(config: dict) -> dict:
    import shutil

    import ray.train
    import torch

    from pipelines.training.checkpoint import TrainState
    from pipelines.training.distributed import all_gather_objects
    from pipelines.training.optim import build_optimizer
    from pipelines.training.reporting import report, write_checkpoint
    from retina.config import to_dict
    from retina.model import build_retinanet

    cfg = config["config"]
    rank = ray.train.get_context().get_world_rank()
    state, write_s, size = None, None, None
    if rank == 0:
        model = build_retinanet(cfg.model)
        optimizer = build_optimizer(model, cfg.train, cfg.data.batch_size)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()  # allocates the momentum buffers a real checkpoint carries
        state = TrainState(step=1, epoch=0, config=to_dict(cfg), label_map=[], model=model.state_dict(),
                           optimizer=optimizer.state_dict(), metrics={})  # fmt: skip
        start = time.perf_counter()
        directory = write_checkpoint(state)
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
        shutil.rmtree(directory)
    times = {}
    for mode in ("sync", "async"):
        times[mode] = report({"step": 1, "checkpoint/score": -1.0}, state, async_upload=mode == "async")
    times["rank"] = rank
    gathered = all_gather_objects(times)
    return {"per_rank": gathered, "write_s": write_s, "bytes": size}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "coco_r50_1x.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import boto3
    import ray
    import ray.train
    from moto.server import ThreadedMotoServer
    from ray.train.torch import TorchTrainer

    from cluster.storage import storage_location
    from pipelines.config import load_config

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    os.environ.update(env)  # before Ray starts: its workers upload with these
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="checkpoints")
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, configure_logging=False, log_to_driver=False)

    cfg = load_config(args.config, [f"scaling.num_workers={args.workers}", "scaling.use_gpu=false"])
    local = tempfile.mkdtemp(prefix="retina-ckpt-bench-")
    rows = []
    for target, location in (("local disk", local), ("S3 (moto on 127.0.0.1)", "s3://checkpoints/runs")):
        storage_path, filesystem, _ = storage_location(location)
        trainer = TorchTrainer(
            _train_func,
            train_loop_config={"config": cfg},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name=f"bench-{len(rows)}", storage_path=storage_path, storage_filesystem=filesystem
            ),  # fmt: skip
        )
        out = trainer.fit().return_value
        per_rank = {t["rank"]: t for t in out["per_rank"]}
        rows.append((target, out["write_s"], out["bytes"], per_rank))
    ray.shutdown()
    server.stop()

    size_mb = rows[0][2] / 1e6
    print(f"\nResNet-50 RetinaNet, 80 classes, + SGD momentum: a {size_mb:.0f} MB checkpoint; {args.workers} workers\n")
    print("| storage | upload | rank 0 in report (s) | other ranks waited (s) | ratio async / sync (others) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for target, _, _, per_rank in rows:
        others = [r for r in per_rank if r != 0]
        for mode in ("sync", "async"):
            wait = max(per_rank[r][mode] for r in others) if others else float("nan")
            sync_wait = max(per_rank[r]["sync"] for r in others) if others else float("nan")
            ratio = f"{wait / sync_wait:.2f}" if mode == "async" else ""
            print(f"| {target} | {mode} | {per_rank[0][mode]:.2f} | {wait:.2f} | {ratio} |")
    print(f"\nwriting state.pt alone (torch.save to local disk): {rows[0][1]:.2f} s")


if __name__ == "__main__":
    main()
