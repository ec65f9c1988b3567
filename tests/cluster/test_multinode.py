"""Cluster-grade training on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster`` on one machine):
a head node for the drivers and the input pipeline's reserved CPUs plus 1-CPU worker nodes, checkpoints on the S3
test server (nodes share no disk in a real cluster), the training command as a separate driver process, nodes
removed, added and drained as preempted.

The training run asks for nothing but CPUs: the head's one CPU is held by its data reservation, so every restart
(elastic or not) can only place workers on the worker nodes, and decoding never starves. In the search, each
simulated node offers one ``retina_test_slot`` and a trial asks for one per worker: losing a node costs exactly
one trial its worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local import RAY, free_port
from pipelines import names
from pipelines.training import restarts
from tests._train_helpers import REPO, data_overrides, smoke_data  # noqa: F401
from tests.s3_server import s3_server  # noqa: F401

pytestmark = pytest.mark.slow

SLOT = "retina_test_slot"
HEAD = "retina_test_head"  # only the head has it: the search's trial drivers ask for a little of it
STEPS, EVERY = 80, 4  # train.max_steps, run.checkpoint_every_steps
# Every step takes >= 0.3 s, so the events below land mid-run whatever the machine's speed, and a checkpoint
# (every 1.2 s or more) is never faster than Ray Train's 0.25 s polling of the workers' reports: with
# asynchronous uploads, reports the controller has not collected when a group stops are lost (docs/cluster.md).
PACE = {"RETINA_TEST_FAULTS": '{"step_delay_s": 0.3}'}
# Ray Train's checks, faster than their defaults so that the scenarios take seconds, not minutes: the workers'
# health (2 s), node drains (5 s), and how long a worker group may wait for its placement (60 s).
FAST_RAY_TRAIN = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}
DRAIN_DEADLINE_S = 5
SEARCH_STEPS = 40


def _cluster(head_cpus: int):
    from ray.cluster_utils import Cluster

    # The head holds the input pipeline's CPUs (scaling.data_cpus, reserved on the driver's node) and the HEAD
    # resource the search's trial drivers ask for; the worker nodes come and go.
    head = {"num_cpus": head_cpus, "resources": {HEAD: 100}, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port()}  # fmt: skip
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture
def cluster(s3_server):  # noqa: F811  (the nodes inherit the S3 endpoint and credentials from os.environ)
    """A 1-CPU head and (added by the test) 1-CPU worker nodes: a restarted worker group could take the head's
    CPU, which the run's data reservation holds (the hang this shape once caused: docs/cluster.md)."""
    yield from _cluster(head_cpus=1)


@pytest.fixture
def search_cluster(s3_server):  # noqa: F811
    """A 3-CPU head: each of two concurrent trials holds 1.25 of it (its driver's 0.25 and the 1 data CPU it
    reserves on its driver's node)."""
    yield from _cluster(head_cpus=3)


def add_worker_node(c, cpus: int = 1, slot: bool = False):
    return c.add_node(num_cpus=cpus, resources={SLOT: 1} if slot else {})


def start_training(c, smoke_data, tmp_path: Path, storage: str, *extra: str) -> tuple[subprocess.Popen, Path]:  # noqa: F811
    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={storage}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.alias=",
        "scaling.min_workers=1",
        "scaling.resize_interval_s=2",
        "scaling.data_cpus=1",  # on the head: the workers can only take the worker nodes' CPUs
        f"train.max_steps={STEPS}",
        # a smaller trunk than the smoke model's: these tests are about restarts, not learning
        "model.backbone.name=resnet10",
        "model.backbone.width=16",
        "train.log_every=1",
        "train.eval_every_epochs=100",  # one evaluation, at the end
        "train.num_logged_images=0",
        f"run.checkpoint_every_steps={EVERY}",
        *extra,
    ]
    return launch(c, "pipelines/train.py", overrides, tmp_path / "driver.log")


def launch(c, script: str, overrides: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """`script` on the smoke config as a driver process of cluster `c`, its output into `log`."""
    # --verbose: the assertions read Ray Train's own lines (restarts, their causes) and the workers' step lines
    command = [sys.executable, script, "--verbose", "--config", "configs/smoke.yaml"]
    command += [arg for o in overrides for arg in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": c.address, **FAST_RAY_TRAIN, **PACE}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) while waiting for {what}:\n" + tail(log))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n" + tail(log))
        time.sleep(0.5)


def tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:]


def checkpoints(storage: str) -> list[str]:
    from cluster import s3

    return sorted(p for p in s3.list_files(s3.join(storage, "smoke")) if p.endswith("/state.pt"))


def world_sizes(tmp_path: Path) -> list[float]:
    """The world sizes the run logged, in the order they were logged ([] before the run exists)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("retina-smoke")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return []
    history = client.get_metric_history(runs[0].info.run_id, names.TRAIN_WORLD_SIZE)
    return [m.value for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def steps_at_world_size(log: Path, world: int) -> int:
    """Training steps logged so far by a group of `world` workers."""
    return len(re.findall(rf"step \d+/\d+ .*world_size={world} ", log.read_text(errors="replace")))


def changes(values: list[float]) -> list[float]:
    """`values` without repeats in a row: [2, 2, 1, 1, 2] → [2, 1, 2]."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def finished_run(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("retina-smoke").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run through every restart
    run = runs[0]
    assert run.info.status == "FINISHED", run.data.tags.get(names.ERROR_TAG)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert steps == list(range(1, STEPS + 1)), steps  # a continuous step metric, no gap and no repeat
    return run


def steps_redone(log: Path) -> list[int]:
    """For each restart: the steps trained again. Rank 0 logs the one "resumed from" line of a restart (the other
    ranks' lines, interleaved with rank 0's steps by Ray's log forwarding, made this count one restart twice)."""
    return restarts.steps_redone(log.read_text(errors="replace"))


def test_node_loss_regrowth_and_preemption(cluster, smoke_data, s3_server, tmp_path):  # noqa: F811
    """One run through three cluster events:
    1. a worker node dies: training goes on with one worker from the latest step checkpoint (one failure);
    2. a node joins: the group grows back to two workers;
    3. a node is drained as preempted: the workers see the notice and checkpoint at once, and the restart is
       charged to run.max_preemption_failures, not run.max_failures (=1, already used by event 1).
    It finishes every step in one MLflow run, with each restart redoing at most one checkpoint interval."""
    clock = Clock()
    node_a, _ = add_worker_node(cluster), add_worker_node(cluster)
    storage = s3_server.new_bucket("multinode") + "/runs"
    proc, log = start_training(cluster, smoke_data, tmp_path, storage, "run.max_failures=1",
                               "run.max_preemption_failures=1")  # fmt: skip
    wait_for(lambda: len(checkpoints(storage)) >= 2, "two step checkpoints", proc, log)
    clock.mark("two step checkpoints; a node dies")
    cluster.remove_node(node_a, allow_graceful=False)
    wait_for(lambda: changes(world_sizes(tmp_path)) == [2, 1], "training on with one worker", proc, log)
    clock.mark("one worker; a node joins")
    node_c = add_worker_node(cluster)
    wait_for(lambda: changes(world_sizes(tmp_path)) == [2, 1, 2], "the group back at two workers", proc, log)
    trained = steps_at_world_size(log, 2)
    wait_for(lambda: steps_at_world_size(log, 2) >= trained + 2, "steps with two workers again", proc, log)
    clock.mark("two workers; a node is preempted")
    drain(cluster, node_c)
    wait_for(lambda: "preemption notice" in log.read_text(errors="replace"), "the preemption notice", proc, log)
    # At the deadline Ray Train ends the attempt as a preemption; then the provider takes the node back. (A node
    # killed before Ray's own deadline check can surface first as a collective error on the surviving ranks and be
    # charged to max_failures: docs/cluster.md.)
    wait_for(lambda: "Source: preemption" in log.read_text(errors="replace"), "the preemption restart", proc, log)
    cluster.remove_node(node_c, allow_graceful=False)
    assert proc.wait(timeout=240) == 0, tail(log)
    clock.mark("finished")

    run = finished_run(tmp_path)
    text = log.read_text(errors="replace")
    assert text.count("Source: worker group") == 1 and text.count("Source: preemption") == 1, tail(log)
    assert changes(world_sizes(tmp_path)) == [2, 1, 2, 1]
    redone = steps_redone(log)  # node loss, regrowth (a resize restarts too), preemption
    assert len(redone) == 3 and all(0 <= r <= EVERY for r in redone), redone
    assert int(run.data.tags[names.RESUMED_FROM_TAG]) > 0
    print(f"steps redone per restart: {redone}")


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def mark(self, what: str) -> None:
        print(f"\n[{time.monotonic() - self.start:5.0f} s] {what}", flush=True)


def node_of_a_training_worker(cluster):
    """The simulated node that hosts a live Ray Train worker (Ray's state API, through the head's dashboard)."""
    from ray.util.state import list_actors

    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")])  # fmt: skip
    assert workers, "no Ray Train worker is alive"
    return next(n for n in cluster.list_all_nodes() if n.node_id == workers[0].node_id)


def drain(cluster, node) -> None:
    """`ray drain-node` with a preemption reason: what a cloud provider's spot reclaim looks like to Ray."""
    command = [RAY, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
               "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed (test)",
               "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)


def test_search_trial_loses_its_node(search_cluster, smoke_data, s3_server, tmp_path):  # noqa: F811
    """A 2-trial search, one worker per trial on its own node; one trial's node dies mid-trial: that trial resumes
    from its step checkpoint on a new node, the other is unaffected, the parent MLflow run has both children."""
    from mlflow.tracking import MlflowClient

    cluster, clock = search_cluster, Clock()
    add_worker_node(cluster, slot=True), add_worker_node(cluster, slot=True)
    storage = s3_server.new_bucket("search") + "/runs"
    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={storage}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=retina-search-multinode",
        "tracking.alias=",
        "scaling.num_workers=1",
        "scaling.data_cpus=1",
        "data.batch_size=2",  # 8 steps per epoch on the 16 smoke images
        f"scaling.resources_per_worker={{{SLOT}: 1}}",
        "model.backbone.name=resnet10",
        "model.backbone.width=16",
        f"train.max_steps={SEARCH_STEPS}",
        "train.log_every=1",
        "train.eval_every_epochs=100",
        "train.num_logged_images=0",
        f"run.checkpoint_every_steps={EVERY}",
        "run.max_failures=1",
        "tuning.name=multinode_search",
        "tuning.num_samples=2",
        "tuning.search_alg=random",
        "tuning.scheduler=none",
        # a trial's driver hosts its Train controller and data coordinators: keep it off the nodes that can go
        f"tuning.driver_resources={{{HEAD}: 0.01}}",
    ]
    proc, log = launch(cluster, "tuning/search.py", overrides, tmp_path / "search.log")

    def trial_checkpoints() -> dict[str, int]:
        from cluster import s3

        found: dict[str, int] = {}
        for path in s3.list_files(s3.join(storage, "multinode_search", "trials")):
            if path.endswith("/state.pt"):
                trial = path.split("/trials/", 1)[1].split("/", 1)[0]
                found[trial] = found.get(trial, 0) + 1
        return found

    # the two trials train side by side (a loaded machine has taken 214 s to a first trial's checkpoint)
    wait_for(lambda: sum(1 for n in trial_checkpoints().values() if n >= 1) == 2, "a checkpoint of each trial",
             proc, log, timeout=600)  # fmt: skip
    # The node of a trial that is still training (under load one trial can be done before the other has started)
    hit = node_of_a_training_worker(cluster)
    clock.mark("both trials checkpointed; the node of a training trial dies")
    cluster.remove_node(hit, allow_graceful=False)
    add_worker_node(cluster, slot=True)  # the capacity for the hit trial to come back on
    assert proc.wait(timeout=300) == 0, tail(log)
    clock.mark("search finished")
    assert "2 trial(s), 2 at a time" in log.read_text(), tail(log)  # side by side: one trial's node loss, not both

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("retina-search-multinode").experiment_id])
    parents = [r for r in runs if names.MLFLOW_PARENT_TAG not in r.data.tags]
    children = [r for r in runs if names.MLFLOW_PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.data.tags[names.MLFLOW_PARENT_TAG] for c in children} == {parents[0].info.run_id}
    assert all(c.data.tags[names.TRIAL_STATUS_TAG] == "completed" for c in children)
    resumed = [int(c.data.tags[names.RESUMED_FROM_TAG]) for c in children if names.RESUMED_FROM_TAG in c.data.tags]
    assert len(resumed) == 1 and resumed[0] >= EVERY, resumed  # the hit trial, from its step checkpoint
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, names.TRAIN_LOSS)]
        assert steps == list(range(1, SEARCH_STEPS + 1)), steps
