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

    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 4.0  # also the worker's torch intra-op threads on CPU
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources, e.g. {"A100": 1}

    def check(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
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
    max_failures: int = 3  # worker failures to recover from (from the latest checkpoint)

    def check(self) -> None:
        require(bool(_RUN_NAME.fullmatch(self.name)), "run.name", "must be 1-128 characters of [A-Za-z0-9_.-]")
        require(bool(self.storage_path), "run.storage_path", "must not be empty")
        require(self.num_to_keep >= 1, "run.num_to_keep", "must be >= 1")
        require(self.max_failures >= -1, "run.max_failures", "must be >= 0 (or -1: retry forever)")
