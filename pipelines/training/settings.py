"""The config sections only Ray Train reads: how many workers and what each holds (`ScalingConfig`), and where
a run lives and how it survives failures (`RunConfig`). Composed into `pipelines.config.Config`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from retina.config import require

_RUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass
class ScalingConfig:
    """How many Ray Train workers and what each one holds. Default: one 8-GPU node (2 images per GPU)."""

    num_workers: int = 8  # the most workers (the full size; data.batch_size is the global batch at this size)
    # Elastic training when 1 <= min_workers < num_workers: the run starts once min_workers fit, keeps going with
    # fewer workers after a node is lost, and grows back (from the latest checkpoint) when capacity returns.
    # 0: a fixed group of num_workers. See docs/cluster.md for what happens to the batch and the lr.
    min_workers: int = 0
    resize_interval_s: float = 60.0  # elastic: how often Ray checks whether more workers fit now
    # Start-up: how long to wait for the cluster to offer min_workers (num_workers when not elastic) plus one CPU
    # for the data pipeline. 0: fail at once with what is missing (a fixed cluster); an autoscaling cluster
    # needs the time to add nodes (e.g. 600).
    capacity_wait_s: float = 0.0
    use_gpu: bool = True
    cpus_per_worker: float = 4.0  # also the worker's torch intra-op threads on CPU
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources, e.g. {"A100": 1}

    @property
    def elastic(self) -> bool:
        return 1 <= self.min_workers < self.num_workers

    @property
    def fewest_workers(self) -> int:
        """The smallest group the run can train with."""
        return self.min_workers if self.elastic else self.num_workers

    def check(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        require(
            0 <= self.min_workers <= self.num_workers,
            "scaling.min_workers",
            f"must be in 0..scaling.num_workers={self.num_workers} (0: not elastic)",
        )
        require(self.resize_interval_s > 0, "scaling.resize_interval_s", "must be > 0")
        require(self.capacity_wait_s >= 0, "scaling.capacity_wait_s", "must be >= 0")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be > 0")
        require(all(v >= 0 for v in self.resources_per_worker.values()), "scaling.resources_per_worker", "must be >= 0")
        require(
            not {"CPU", "GPU"} & set(self.resources_per_worker),
            "scaling.resources_per_worker",
            "CPU/GPU come from scaling.cpus_per_worker / scaling.use_gpu",
        )


@dataclass
class RunConfig:
    """Where a run lives. The same name + storage_path resumes the run instead of starting over."""

    name: str = "retinanet_r50_fpn_1x"
    storage_path: str = "runs"  # local folder (relative to the working directory) or s3://bucket/prefix
    num_to_keep: int = 2  # best checkpoints by val/AP (Ray always keeps the latest one too)
    # Checkpoints between evaluations, so a lost worker costs at most this much work (0: off). A step checkpoint
    # is due when either limit is reached; every evaluation checkpoints too.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    # Upload checkpoints in a background thread (Ray's ASYNC mode): the ranks wait only for rank 0 to write the
    # file locally, not for the copy to storage. A checkpoint counts as the latest only once its upload finished.
    async_upload: bool = True
    max_failures: int = 3  # worker failures to recover from (from the latest checkpoint); -1: forever
    # Nodes taken back by their provider (spot/preemptible; a drain with a preemption reason) are counted apart
    # from failures: -1 = recover from every preemption.
    max_preemption_failures: int = -1

    def check(self) -> None:
        require(bool(_RUN_NAME.fullmatch(self.name)), "run.name", "must be 1-128 characters of [A-Za-z0-9_.-]")
        require(bool(self.storage_path), "run.storage_path", "must not be empty")
        require(self.num_to_keep >= 1, "run.num_to_keep", "must be >= 1")
        require(self.max_failures >= -1, "run.max_failures", "must be >= 0 (or -1: retry forever)")
        require(self.max_preemption_failures >= -1, "run.max_preemption_failures", "must be >= 0 (or -1: forever)")
        require(self.checkpoint_every_steps >= 0, "run.checkpoint_every_steps", "must be >= 0 (0: off)")
        require(self.checkpoint_every_minutes >= 0, "run.checkpoint_every_minutes", "must be >= 0 (0: off)")
