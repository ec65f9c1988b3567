"""Start-up sanity: does the cluster hold what the run needs? Checked before any worker starts, instead of a job
that waits forever (Ray Train for its worker group, Ray Data for a CPU to decode on).

A run needs its workers (scaling.min_workers for an elastic run, else scaling.num_workers; each with
scaling.cpus_per_worker CPUs, one GPU with scaling.use_gpu, and scaling.resources_per_worker), placed whole on
nodes, plus scaling.data_cpus CPUs for the Ray Data tasks that decode the images (reserved for the whole run by
`pipelines.training.reservation`). The check counts the cluster's total resources per alive node (not what is
free right now: another job's tasks come and go). On an autoscaling cluster, scaling.capacity_wait_s gives the
autoscaler time to add nodes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import ray

from cluster import s3
from pipelines.training.settings import ScalingConfig
from retina.typed_config import ConfigError

logger = logging.getLogger("retina.train")

POLL_S = 5.0


class CapacityError(ConfigError):
    """The cluster cannot hold the run's workers and its data pipeline; the message names the numbers and the
    settings to change."""


@dataclass
class Fit:
    workers: int  # workers that fit on the alive nodes, each placed whole
    start_workers: int  # what Ray will start: num_workers, or as many as fit for an elastic run
    spare_cpus: float  # CPUs left for the data pipeline once `start_workers` run
    total: dict[str, float]  # the cluster's resources
    nodes: int  # alive nodes with CPUs or GPUs


def _per_node_workers(resources: dict[str, float], sc: ScalingConfig) -> int:
    need = {"CPU": sc.cpus_per_worker, **({"GPU": 1.0} if sc.use_gpu else {}), **sc.resources_per_worker}
    return min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)


def measure(nodes: list[dict[str, Any]], sc: ScalingConfig) -> Fit:
    """How `sc`'s workers fit on `nodes` (``ray.nodes()`` entries)."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    total: dict[str, float] = {}
    for res in alive:
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + v
    workers = sum(_per_node_workers(res, sc) for res in alive)
    # an elastic run starts as many as fit beside the data reservation (pipelines/training/reservation.py)
    beside_data = math.floor((total.get("CPU", 0.0) - sc.data_cpus) / sc.cpus_per_worker + 1e-9)
    start = max(0, min(sc.num_workers, workers, beside_data)) if sc.elastic else sc.num_workers
    spare = total.get("CPU", 0.0) - start * sc.cpus_per_worker
    hosts = sum(1 for res in alive if res.get("CPU", 0) > 0 or res.get("GPU", 0) > 0)
    return Fit(workers, start, spare, total, hosts)


def total_cpus(fit: Fit) -> float:
    return fit.total.get("CPU", 0.0)


def shortfall(fit: Fit, sc: ScalingConfig) -> str | None:
    """What is missing, in words naming the settings; None when the run fits."""
    need = sc.fewest_workers
    gpu = " and 1 GPU" if sc.use_gpu else ""
    have = f"the cluster has {fit.total.get('CPU', 0):g} CPUs, {fit.total.get('GPU', 0):g} GPUs on {fit.nodes} node(s)"
    change = (
        "Lower scaling.num_workers or scaling.cpus_per_worker, set scaling.min_workers for an elastic run, or add "
        "nodes (an autoscaling cluster: set scaling.capacity_wait_s to wait for them)"
    )
    if fit.workers < need:
        return (f"the run needs {need} workers (scaling.{'min' if sc.elastic else 'num'}_workers) of "
                f"{sc.cpus_per_worker:g} CPUs{gpu} each (scaling.cpus_per_worker), but only {fit.workers} fit: "
                f"{have}. {change}.")  # fmt: skip
    if fit.start_workers < need or fit.spare_cpus < sc.data_cpus:
        workers = max(fit.start_workers, need)
        return (f"{workers} workers x {sc.cpus_per_worker:g} CPUs (scaling.{'min' if sc.elastic else 'num'}_workers "
                f"x scaling.cpus_per_worker) leave {max(total_cpus(fit) - workers * sc.cpus_per_worker, 0):g} CPUs "
                f"for the input pipeline, which reserves scaling.data_cpus={sc.data_cpus}: {have}. {change}, or "
                "lower scaling.data_cpus.")  # fmt: skip
    return None


def check_capacity(sc: ScalingConfig, storage_path: str) -> Fit:
    """Wait up to scaling.capacity_wait_s for the cluster to hold the run; CapacityError when it does not.
    Also warns when several nodes would share a local run.storage_path (safe only on a shared filesystem)."""
    deadline = time.monotonic() + sc.capacity_wait_s
    while True:
        fit = measure(ray.nodes(), sc)
        missing = shortfall(fit, sc)
        if missing is None:
            break
        if time.monotonic() >= deadline:
            raise CapacityError(missing)
        logger.info("waiting for capacity (%.0f s left): %s", deadline - time.monotonic(), missing)
        time.sleep(POLL_S)
    if fit.nodes > 1 and not s3.is_s3(storage_path):
        logger.warning(
            "run.storage_path %s is a local path on a cluster of %d nodes: a worker restarted on another node finds "
            "the checkpoints only if this path is a shared filesystem (NFS, EFS, ...) mounted at the same place on "
            "every node; otherwise use s3://bucket/prefix (see docs/cluster.md)", storage_path, fit.nodes,
        )  # fmt: skip
    return fit
