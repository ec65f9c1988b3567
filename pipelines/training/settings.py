"""The config sections the training layer reads: the optimisation recipe (`TrainConfig`), how many Ray Train
workers and what each holds (`ScalingConfig`), and where a run lives and how it survives failures (`RunConfig`).
Composed into `pipelines.config.Config`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from retina.typed_config import require

_RUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_lr(value: float, key: str) -> None:
    """The learning rate's range rule (train.base_lr, and the search's tuning.lr)."""
    require(math.isfinite(value) and value > 0, key, f"the learning rate must be a finite number > 0, got {value}")


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults: the paper's COCO 1x schedule (Detectron's RetinaNet settings)."""

    max_steps: int = 90_000  # optimizer steps (iterations); epochs follow from the data size
    base_lr: float = 0.01  # for `base_batch_size` images per step; scaled linearly with data.batch_size
    base_batch_size: int = 16
    # sgd (the paper: momentum + weight decay) | adamw (decoupled decay; short runs from scratch)
    optimizer: str = "sgd"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # linear warm-up from warmup_factor * lr (Detectron: 500 iters from 1/3)
    warmup_factor: float = 1 / 3
    lr_steps: list[int] = field(default_factory=lambda: [60_000, 80_000])  # iterations where lr *= lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float = 0.0  # max total gradient norm; 0 disables clipping (the paper does not clip)
    # none | bf16 (autocast; GPU, or CPU with AVX-512 BF16 / AMX) | fp16 (+ GradScaler, GPU) | auto (bf16 where it
    # runs natively, else none: decided by each worker for its device, pipelines.training.step.resolve_amp)
    amp: str = "none"
    seed: int = 0  # initial weights, the shard order of every epoch, each image's scale and flip
    # the same config and seed give the same run: decode outputs kept in plan order (Ray Data preserve_order) and
    # PyTorch's deterministic kernels (on CUDA also no cuDNN autotuning); see docs/training.md for its price
    deterministic: bool = True
    log_every: int = 20  # steps between loss/lr/throughput logs
    eval_every_epochs: int = 1  # evaluation (and a checkpoint) every N epochs, and always at the end
    num_logged_images: int = 4  # val images drawn with predicted and true boxes into MLflow
    # COCOeval of every evaluation but the last in a Ray task while training goes on; the val metrics and the
    # checkpoint are reported when it is done (pipelines/training/background_eval.py). false: the ranks wait
    background_eval: bool = True
    eval_task_cpus: float = 0.0  # CPUs the scoring task reserves (0: it shares the cores the workers hold)

    def check(self) -> None:
        """The recipe's range rules; ConfigError naming the key."""
        require(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        check_lr(self.base_lr, "train.base_lr")
        require(self.base_batch_size >= 1, "train.base_batch_size", "must be >= 1")
        require(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        require(self.optimizer in ("sgd", "adamw"), "train.optimizer", "must be sgd or adamw")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
        require(0 < self.warmup_factor <= 1, "train.warmup_factor", "must be in (0, 1]")
        require(self.lr_steps == sorted(self.lr_steps), "train.lr_steps", "must be increasing")
        require(all(s >= 1 for s in self.lr_steps), "train.lr_steps", "must be >= 1 (iterations)")
        require(0 < self.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")
        require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        require(self.amp in ("none", "bf16", "fp16", "auto"), "train.amp", "must be none, bf16, fp16 or auto")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(self.eval_every_epochs >= 1, "train.eval_every_epochs", "must be >= 1")
        require(self.num_logged_images >= 0, "train.num_logged_images", "must be >= 0")
        require(self.eval_task_cpus >= 0, "train.eval_task_cpus", "must be >= 0")


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
    # CPUs held for the input pipeline's decode tasks for the whole run (a placement group created before the
    # workers; pipelines/training/reservation.py): no (re)start of the worker group can take them, and decoding
    # never uses more. COCO at 800/1333 decodes ~20 images/s per CPU (docs/benchmarks.md).
    data_cpus: int = 16
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources, e.g. {"A100": 1}

    @property
    def elastic(self) -> bool:
        return 1 <= self.min_workers < self.num_workers

    @property
    def fewest_workers(self) -> int:
        """The smallest group the run can train with."""
        return self.min_workers if self.elastic else self.num_workers

    @property
    def run_cpus(self) -> float:
        """CPUs one run holds at its full size: its workers' and the input pipeline's (a local Ray is sized for
        this, a search counts it per trial)."""
        return self.num_workers * self.cpus_per_worker + self.data_cpus

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
        require(self.data_cpus >= 1, "scaling.data_cpus", "must be >= 1 (the input pipeline decodes on them)")
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
    # A worker whose next batch does not come for this long fails the attempt with an error naming what waits and
    # the cluster's resources (run.max_failures counts it); 0 waits forever. Well above the first batch of a cold
    # start (a few seconds here, tens of seconds from S3 at COCO sizes).
    stall_timeout_s: float = 300.0

    def check(self) -> None:
        require(bool(_RUN_NAME.fullmatch(self.name)), "run.name", "must be 1-128 characters of [A-Za-z0-9_.-]")
        require(bool(self.storage_path), "run.storage_path", "must not be empty")
        require(self.num_to_keep >= 1, "run.num_to_keep", "must be >= 1")
        require(self.max_failures >= -1, "run.max_failures", "must be >= 0 (or -1: retry forever)")
        require(self.max_preemption_failures >= -1, "run.max_preemption_failures", "must be >= 0 (or -1: forever)")
        require(self.checkpoint_every_steps >= 0, "run.checkpoint_every_steps", "must be >= 0 (0: off)")
        require(self.checkpoint_every_minutes >= 0, "run.checkpoint_every_minutes", "must be >= 0 (0: off)")
        require(self.stall_timeout_s >= 0, "run.stall_timeout_s", "must be >= 0 (0: wait forever)")
