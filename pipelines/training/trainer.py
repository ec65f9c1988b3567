"""The Ray Train side of a run: the TorchTrainer for a config, and the best checkpoint of its Result."""

from __future__ import annotations

from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from cluster.storage import storage_location
from pipelines.config import Config
from pipelines.names import CHECKPOINT_SCORE, VAL_AP
from pipelines.training.checkpoint import TrainState, load_checkpoint
from pipelines.training.loop import RunInputs, train_func


def build_trainer(cfg: Config, inputs: RunInputs, callbacks: list[Any] | None = None) -> TorchTrainer:
    """TorchTrainer running `train_func` on scaling.num_workers workers; checkpoints kept by val/AP.

    No datasets: each worker reads its own rows of the run's data plan (`pipelines.training.loop`).
    `callbacks`: Ray Train run callbacks (a search trial adds Tune's reporting bridge)."""
    storage_path, filesystem, _ = storage_location(cfg.run.storage_path)
    sc, run = cfg.scaling, cfg.run
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {}), **sc.resources_per_worker}
    return TorchTrainer(
        train_func,
        train_loop_config={"inputs": inputs},  # Ray's contract: a dict
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            # (min, max): Ray starts once `min` fit, and every resize restarts the group from the latest checkpoint
            num_workers=(sc.min_workers, sc.num_workers) if sc.elastic else sc.num_workers,
            elastic_resize_monitor_interval_s=sc.resize_interval_s,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # Ray keeps the num_to_keep best by score plus the latest: the best evaluated checkpoints (score =
            # val/AP) and the newest step checkpoint (score -1), whatever its age.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.num_to_keep, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=run.max_failures, max_preemption_failures=run.max_preemption_failures
            ),
            callbacks=callbacks or None,
        ),
    )


def best_checkpoint(result: ray.train.Result) -> ray.train.Checkpoint | None:
    """The reported checkpoint with the highest val/AP (Ray's kept set), else the latest one."""
    scored = [(m.get(VAL_AP, -1.0), c) for c, m in (result.best_checkpoints or []) if m]
    if scored:
        return max(scored, key=lambda t: t[0])[1]
    return result.checkpoint


def read_checkpoint(checkpoint: ray.train.Checkpoint) -> TrainState:
    """A Ray checkpoint (local or on the run's storage) → its `TrainState`."""
    with checkpoint.as_directory() as directory:
        return load_checkpoint(directory)
