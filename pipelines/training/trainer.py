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
from pipelines.training.loop import train_func


class SplitValUnequally(ray.train.DataConfig):
    """Train splits equally (every DDP rank takes the same number of steps); val splits without dropping rows.

    Ray's default splits every dataset with ``equal=True``, which drops rows to even the parts out: fine for
    training, wrong for evaluation (the dropped images would be missing from COCOeval). Uneven val parts are
    safe because evaluation has no per-batch collective (see pipelines/training/evaluation.py).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"]
            if val.name is None:
                val.set_name("val")
            for i, part in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[i]["val"] = part
        return output


def build_trainer(
    cfg: Config, loop_config: dict[str, Any], datasets: dict[str, Any], callbacks: list[Any] | None = None
) -> TorchTrainer:
    """TorchTrainer running `train_func` on scaling.num_workers workers; checkpoints kept by val/AP.

    `callbacks`: Ray Train run callbacks (a search trial adds Tune's reporting bridge)."""
    storage_path, filesystem, _ = storage_location(cfg.run.storage_path)
    sc, run = cfg.scaling, cfg.run
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {}), **sc.resources_per_worker}
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
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
        datasets=datasets,
        dataset_config=SplitValUnequally(),
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
