"""Shared fixtures. Integration fixtures (Ray, servers) are session-scoped: each costs seconds to start."""

from __future__ import annotations

import os

import pytest

# Keep the suite inside the 2-core machine: torch's intra-op threads compete with Ray workers otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster for the whole session, dashboard on loopback (Train V2 under Tune needs it)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            # always a new local instance: never join another Ray found on the machine (a second test session's,
            # a simulated multi-node cluster's), whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster says
            address="local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


def pytest_configure(config: pytest.Config) -> None:
    """Before any xdist worker starts: the Ray auth token the job API tests read, made once (two workers that both
    found none would each generate one, and a head started with the first would refuse the second)."""
    if not hasattr(config, "workerinput"):
        from cluster.local import ensure_auth_token

        ensure_auth_token()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration (slow) test files first, in their order: xdist hands each process the next file as it
    finishes one, so the long files start early and the many short ones fill in at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
