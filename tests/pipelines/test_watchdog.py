"""The stall watchdog (pipelines/training/watchdog.py) on a real local Ray: a stream whose decode task can never
get a CPU fails within run.stall_timeout_s, naming what waits and the cluster's resources; a stream that flows is
passed through whole, and its own errors surface as they are."""

from __future__ import annotations

import time

import pytest
import ray

from pipelines.training.watchdog import DataStallError, watched

pytestmark = pytest.mark.slow


def _starved(n_cpus: float):
    """Batches from a Ray task asking for more CPUs than the cluster has: it stays pending forever."""

    @ray.remote(num_cpus=n_cpus)
    def decode() -> list[int]:
        return [1, 2, 3]

    yield ray.get(decode.remote())


def test_a_starved_stream_fails_in_time_with_the_cluster_named(ray_local):
    too_many = ray.cluster_resources()["CPU"] + 1
    started = time.monotonic()
    with pytest.raises(DataStallError) as err:
        next(watched(_starved(too_many), timeout_s=2, what="train batch for rank 0"))
    assert 2 <= time.monotonic() - started < 10
    message = str(err.value)
    assert "no train batch for rank 0 in 2 s (run.stall_timeout_s)" in message
    assert f"CPU {ray.cluster_resources()['CPU']:g} in all" in message and "scaling.data_cpus" in message


def test_a_flowing_stream_passes_whole_and_its_errors_surface():
    assert list(watched(iter(range(5)), timeout_s=5, what="x")) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("shard part-3.parquet is truncated")

    stream = watched(broken(), timeout_s=5, what="x")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="part-3.parquet"):
        next(stream)
