"""The start-up capacity check (pipelines/training/capacity.py) on node lists shaped like ``ray.nodes()``: a run
that cannot fit is refused with the numbers and the settings to change, instead of a job that waits forever."""

from __future__ import annotations

import pytest

from pipelines.training.capacity import CapacityError, check_capacity, measure, shortfall
from pipelines.training.settings import ScalingConfig


def node(cpus: float, gpus: float = 0, alive: bool = True, **extra: float) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **extra}}


def scaling(**kw) -> ScalingConfig:
    return ScalingConfig(**{"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1.0, "data_cpus": 1, **kw})


def test_two_one_cpu_workers_on_a_two_cpu_head_leave_no_cpu_for_the_data_pipeline():
    # the case that used to hang: `ray start --head --num-cpus 2`, then the smoke config's two 1-CPU workers
    fit = measure([node(2)], scaling())
    message = shortfall(fit, scaling())
    assert message is not None
    assert "2 workers x 1 CPUs" in message and "leave 0 CPUs for the input pipeline" in message
    assert "scaling.data_cpus=1" in message
    assert "scaling.num_workers" in message and "scaling.min_workers" in message and "2 CPUs" in message


def test_workers_are_placed_whole_on_nodes():
    sc = scaling(num_workers=4, use_gpu=True, cpus_per_worker=4.0)
    # 3 GPUs in all, but a worker needs 4 CPUs and a GPU on the same node: only 2 fit
    fit = measure([node(8, gpus=2), node(2, gpus=1), node(16)], sc)
    assert fit.workers == 2
    message = shortfall(fit, sc)
    assert "needs 4 workers (scaling.num_workers)" in message and "only 2 fit" in message and "1 GPU" in message


def test_an_elastic_run_needs_only_its_minimum_beside_the_data_reservation_and_dead_nodes_do_not_count():
    sc = scaling(num_workers=4, min_workers=2)
    nodes = [node(2), node(2), node(64, alive=False)]
    fit = measure(nodes, sc)
    assert (fit.workers, fit.start_workers, fit.nodes) == (4, 3, 2)  # the reserved data CPU is left out
    assert shortfall(fit, sc) is None
    sc = scaling(num_workers=4, min_workers=2, data_cpus=3)
    message = shortfall(measure(nodes, sc), sc)
    assert "leave 2 CPUs for the input pipeline, which reserves scaling.data_cpus=3" in message
    assert shortfall(measure([*nodes, node(1)], sc), sc) is None


def test_custom_resources_per_worker_limit_the_placement():
    sc = scaling(resources_per_worker={"slot": 1.0})
    assert measure([node(4, slot=1), node(4)], sc).workers == 1
    assert shortfall(measure([node(4, slot=1), node(4, slot=1)], sc), sc) is None


def test_check_capacity_raises_without_waiting_on_a_fixed_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [node(2)])
    with pytest.raises(CapacityError, match="leave 0 CPUs for the input pipeline"):
        check_capacity(scaling(), "runs")


def test_local_storage_on_several_nodes_is_called_out(monkeypatch, caplog):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [node(4), node(4)])
    with caplog.at_level("WARNING", logger="retina.train"):
        check_capacity(scaling(), "/home/me/runs")
    assert "only if this path is a shared filesystem" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="retina.train"):
        check_capacity(scaling(), "s3://bucket/runs")
    assert "shared filesystem" not in caplog.text
