"""What a COCO-recipe checkpoint costs and how long it holds the ranks: local disk vs S3, synchronous vs async upload.

    python benchmarks/checkpoint_cost.py [--config configs/coco_r50_1x.yaml] [--workers 2]

The checkpoint is the COCO recipe's: a ResNet-50 RetinaNet with 80 classes (random weights; the size is what
matters) and its SGD momentum state after one step, written by `pipelines.training.reporting` exactly as training
writes it. A 2-worker TorchTrainer on a local Ray reports it through `ray.train.report`, with the run's storage on
local disk and on a moto S3 server on 127.0.0.1 (started here), once with Ray's synchronous upload and once with
the asynchronous one (run.async_upload, the default). Printed per case: the seconds rank 0 spent in the report
(its local write, plus the upload when synchronous), which is what the whole group loses (the other ranks leave
the report sooner but wait for rank 0 at the next step's gradient all-reduce), its ratio against the synchronous
upload, and the seconds the other ranks spent in the report. Each
case is its own TorchTrainer run, and the ranks meet at a barrier right before the report.
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
    from retina.model import build_retinanet
    from retina.typed_config import to_dict

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
    torch.distributed.barrier()  # every rank enters the report together: the wait measured is the report's own
    seconds = report({"step": 1, "checkpoint/score": -1.0}, state, async_upload=config["async_upload"])
    gathered = all_gather_objects({"rank": rank, "seconds": seconds})
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
    ray.init(
        address="local",
        num_cpus=args.workers + 1,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )

    cfg = load_config(
        args.config, [f"scaling.num_workers={args.workers}", "scaling.min_workers=0", "scaling.use_gpu=false"]
    )
    local = tempfile.mkdtemp(prefix="retina-ckpt-bench-")
    rows = []
    cases = [(target, location, mode) for target, location in (("local disk", local),
             ("S3 (moto on 127.0.0.1)", "s3://checkpoints/runs")) for mode in ("sync", "async")]  # fmt: skip
    for target, location, mode in cases:  # one trainer per case: no upload of one case overlaps the next
        storage_path, filesystem, _ = storage_location(location)
        trainer = TorchTrainer(
            _train_func,
            train_loop_config={"config": cfg, "async_upload": mode == "async"},
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(
                name=f"bench-{len(rows)}", storage_path=storage_path, storage_filesystem=filesystem
            ),  # fmt: skip
        )
        start = time.perf_counter()
        out = trainer.fit().return_value
        total = time.perf_counter() - start
        per_rank = {t["rank"]: t["seconds"] for t in out["per_rank"]}
        others = max((v for r, v in per_rank.items() if r != 0), default=float("nan"))
        rows.append((target, mode, per_rank[0], others, out["write_s"], out["bytes"], total))
        print(f"{target}, {mode}: done in {total:.0f} s", flush=True)
    ray.shutdown()
    server.stop()

    size_mb = rows[0][5] / 1e6
    print(f"\nResNet-50 RetinaNet, 80 classes, + SGD momentum: a {size_mb:.0f} MB checkpoint; {args.workers} workers\n")
    print("| storage | upload | rank 0 in the report (s) = the group's stall | ratio vs sync | other ranks in the "
          "report (s) |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: |")
    sync = {target: rank0 for target, mode, rank0, *_ in rows if mode == "sync"}
    for target, mode, rank0, others, *_ in rows:
        print(f"| {target} | {mode} | {rank0:.2f} | {rank0 / sync[target]:.2f} | {others:.2f} |")
    print("\n(the other ranks leave the report earlier, then wait for rank 0 at the next step's gradient all-reduce)")
    print(f"\nwriting state.pt alone (torch.save to local disk, rank 0): {rows[0][4]:.2f} s")


if __name__ == "__main__":
    main()
