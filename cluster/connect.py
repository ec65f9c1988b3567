"""How a command reaches Ray: the cluster named by RAY_ADDRESS (also set by ``ray job submit``), else a local Ray
started on this machine with its dashboard on 127.0.0.1."""

from __future__ import annotations

import logging
import math
import os

import ray


def connect_ray(*, cpus_needed: float = 0.0, dashboard: bool = True, log_to_driver: bool = True) -> None:
    """Join RAY_ADDRESS's cluster, else start a local Ray; a no-op when Ray is already initialised.

    `cpus_needed`: the logical CPUs the caller reserves (workers); a local Ray gets at least that plus 2 for Ray
    Data's decode tasks (Ray does not pin cores: logical CPUs above the physical count only oversubscribe).
    `dashboard`: Train V2's placement-group clean-up uses the state API in the dashboard process, so training
    and search need it; batch inference does not.
    `log_to_driver`: forward the workers' stdout/stderr to this process's console (their logs stay in Ray's log
    folder either way, and errors still reach the driver as exceptions).
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False, log_to_driver=log_to_driver)
        return
    # Ray 2.60 turns token authentication on for a new local cluster (the safe default, which we want) and warns
    # that it did, on every start; nothing for the user to do, so that one logger is kept to errors.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed) + 2),
        include_dashboard=dashboard,
        **({"dashboard_host": "127.0.0.1"} if dashboard else {}),
        configure_logging=False,
        log_to_driver=log_to_driver,
    )
