"""How a command reaches Ray: the cluster named by RAY_ADDRESS (also set by ``ray job submit``), else a local Ray
of its own, started on this machine with its dashboard on 127.0.0.1.

"Of its own" matters: ``ray.init()`` without an address joins whatever Ray's current-cluster file names
(``ray_current_cluster`` in Ray's temp folder: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray), which ``ray
start`` writes and only ``ray stop`` removes: a head killed without ``ray stop``, a local head still running, the
latest of several Ray instances. Joining one of those was never asked for, and fails anyway once we size the
local Ray ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
"""

from __future__ import annotations

import logging
import math
import os

import ray

from cluster.ray_compat import TOKEN_SETUP_LOGGER

logger = logging.getLogger("retina.cluster")


def connect_ray(*, cpus_needed: float = 0.0, dashboard: bool = True, log_to_driver: bool = True) -> None:
    """Join RAY_ADDRESS's cluster, else start a local Ray; a no-op when Ray is already initialised.

    `cpus_needed`: the logical CPUs the caller reserves (workers and the CPUs held for decoding); a local Ray gets
    at least that (Ray does not pin cores: logical CPUs above the physical count only oversubscribe). A joined
    cluster is sized by whoever started it.
    `dashboard`: Train V2's placement-group clean-up uses the state API in the dashboard process, so training
    and search need it; batch inference does not.
    `log_to_driver`: forward the workers' stdout/stderr to this process's console (their logs stay in Ray's log
    folder either way, and errors still reach the driver as exceptions).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("joining the Ray cluster at RAY_ADDRESS=%s (sized by whoever started it)", address)
        ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
        return
    # Ray 2.60 turns token authentication on for a new local cluster (the safe default, which we want) and warns
    # that it did, on every start; nothing for the user to do, so that one logger is kept to errors.
    logging.getLogger(TOKEN_SETUP_LOGGER).setLevel(logging.ERROR)
    ray.init(
        address="local",  # always a new local Ray, whatever the current-cluster file names (module docstring)
        num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)),
        include_dashboard=dashboard,
        **({"dashboard_host": "127.0.0.1"} if dashboard else {}),
        configure_logging=False,
        log_to_driver=log_to_driver,
    )
