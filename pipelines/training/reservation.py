"""CPUs held for the input pipeline for a whole run (scaling.data_cpus), so no (re)start of the worker group can take
them.

Without a reservation the decode tasks compete with the workers for CPUs: an elastic restart after a node loss
took every CPU left (the head's included) and Ray Data never got one to decode on. A placement group of 1-CPU
bundles is created before the trainer starts, every decode task of the run runs inside it (each rank's Ray Data
execution with its share: `pipelines.data.datasets.DecodeCpus`), and an elastic run also tells Train's elastic
policy that these CPUs are taken (`cluster.ray_compat`).

The bundles go on the driver's node when it has the CPUs: the run cannot outlive that node anyway (the driver,
Train's controller and the MLflow client live there), so pinning them there adds no way to fail. Elsewhere they are
packed onto as few nodes as possible. The group is removed at the end of the run; Ray also removes it when its
creator (the driver, or a search trial's process) dies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from cluster.ray_compat import ElasticReservation
from pipelines.training.capacity import CapacityError

logger = logging.getLogger("retina.train")

NODE_ID_LABEL = "ray.io/node-id"  # the label every Ray node carries with its own id
PINNED_WAIT_S = 5.0  # how long the driver's node may take to free the CPUs before they are placed elsewhere


@dataclass
class DataReservation:
    group: PlacementGroup
    cpus: int
    elastic: ElasticReservation | None  # registered with Train's elastic policy (elastic runs only)

    def release(self) -> None:
        if self.elastic is not None:
            self.elastic.cancel()
        remove_placement_group(self.group)


def _place(cpus: int, node: str | None, wait_s: float) -> PlacementGroup | None:
    """A ready placement group of `cpus` 1-CPU bundles (on `node` when given), or None within `wait_s`."""
    selectors = [{NODE_ID_LABEL: node} for _ in range(cpus)] if node else None
    group = placement_group([{"CPU": 1.0}] * cpus, strategy="PACK", bundle_label_selector=selectors)
    if group.wait(timeout_seconds=wait_s):
        return group
    remove_placement_group(group)
    return None


def reserve_data_cpus(cpus: int, *, wait_s: float, requester_id: str, elastic: bool) -> DataReservation:
    """Hold `cpus` CPUs for decoding; CapacityError naming scaling.data_cpus when the cluster cannot give them
    within `wait_s` (at least a few seconds: placing a group takes a moment even when it fits)."""
    driver_node = ray.get_runtime_context().get_node_id()
    node_cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == driver_node), 0)
    deadline = time.monotonic() + max(wait_s, 10.0)
    group = _place(cpus, driver_node, PINNED_WAIT_S) if node_cpus >= cpus else None
    while group is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CapacityError(
                f"cannot reserve scaling.data_cpus={cpus} CPUs for the input pipeline (Ray: "
                f"{ray.available_resources().get('CPU', 0):g} of {ray.cluster_resources().get('CPU', 0):g} CPUs free);"
                " lower scaling.data_cpus, free the CPUs, or set scaling.capacity_wait_s to wait for them"
            )
        group = _place(cpus, None, left)
    registered = None
    if elastic:
        nodes = placement_group_table(group)["bundles_to_node_id"]
        registered = ElasticReservation(requester_id, [{"CPU": 1.0}] * cpus,
                                        [{NODE_ID_LABEL: nodes[i]} for i in range(cpus)])  # fmt: skip
    where = sorted(set(placement_group_table(group)["bundles_to_node_id"].values()))
    logger.info("reserved %d CPU(s) for the input pipeline on node(s) %s", cpus, ", ".join(n[:8] for n in where))
    return DataReservation(group, cpus, registered)
