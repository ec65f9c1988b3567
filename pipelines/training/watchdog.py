"""No silent waits for data: a batch stream that fails with a clear error when its next batch does not come.

A batch stream waits as long as its decode tasks wait for a CPU; when the cluster has none to give (a worker
group that took every CPU after an elastic restart, a node gone with the data reservation on it), a worker would
wait forever. `watched` fetches each batch in a background thread and gives up after `timeout_s` with a
`DataStallError` that names what waits and the cluster's resources (total, free, held by placement groups).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import ray

_END = object()


class DataStallError(RuntimeError):
    """No batch arrived within run.stall_timeout_s; the message names the stream and the cluster's resources."""


def cluster_resources_line() -> str:
    """The cluster's CPUs/GPUs in one line: total, free now, and held by placement groups (worker groups, the data
    reservation): what a person needs to see why a task cannot start."""
    total, free = ray.cluster_resources(), ray.available_resources()
    held: dict[str, float] = {}
    for group in ray.util.placement_group_table().values():
        if group.get("state") == "CREATED":
            for bundle in group.get("bundles", {}).values():
                for key, value in bundle.items():
                    held[key] = held.get(key, 0.0) + value
    parts = []
    for key in ("CPU", "GPU"):
        if total.get(key):
            parts.append(f"{key} {total[key]:g} in all, {free.get(key, 0.0):g} free, {held.get(key, 0.0):g} held by "
                         "placement groups")  # fmt: skip
    return "; ".join(parts) or "no CPU or GPU"


def watched(batches: Iterator[Any], timeout_s: float, what: str) -> Iterator[Any]:
    """`batches`, each fetched in a background thread; DataStallError when one takes longer than `timeout_s`
    (0: wait forever). Exceptions of the stream are re-raised here."""
    if timeout_s <= 0:
        yield from batches
        return
    ready: queue.Queue = queue.Queue(maxsize=1)  # one batch ahead, as the stream itself prefetches

    def fetch() -> None:
        try:
            for batch in batches:
                ready.put((batch, None))
            ready.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((None, exc))

    threading.Thread(target=fetch, name="batch-fetch", daemon=True).start()
    while True:
        try:
            batch, error = ready.get(timeout=timeout_s)
        except queue.Empty:
            raise DataStallError(
                f"no {what} in {timeout_s:g} s (run.stall_timeout_s): its decode tasks are not getting the "
                f"resources they wait for. Cluster: {cluster_resources_line()}. Check that scaling.data_cpus fit "
                "beside the workers, or raise run.stall_timeout_s if the data is just slow to read"
            ) from None
        if error is not None:
            raise error
        if batch is _END:
            return
        yield batch
