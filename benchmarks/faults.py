"""The fault table: the faults an operator meets, each injected into a real training run, and what became of it.

    python benchmarks/faults.py [--cases clean,worker-sigkill,mlflow-down,s3-down,preempted-replaced]
                                [--outage-s 30] [--steps 80]

One simulated cluster serves every case (``ray.cluster_utils.Cluster`` on this machine: a 1-CPU head holding the
input pipeline's CPU, two 1-CPU worker nodes), with checkpoints on a real S3 server (moto on 127.0.0.1, reached
through a TCP gate this script can close) and tracking on a real ``mlflow server`` on 127.0.0.1 (SQLite store).
Each case runs ``pipelines/train.py`` on the smoke data (``--steps`` steps of at least 0.3 s, a step checkpoint
every 4, elastic between 1 and 2 workers) as its own driver process and experiment, and injects its fault once
the run has two checkpoints:

    clean               nothing: the baseline wall time
    worker-sigkill      SIGKILL to the process of one Ray Train worker (charged to run.max_failures)
    mlflow-down         the MLflow server stopped for --outage-s seconds, then started again on the same store
    s3-down             every connection to S3 cut and refused for --outage-s seconds, just before a checkpoint
    preempted-replaced  a worker node drained as preempted (5 s notice), removed, and a new node added

Printed per case: the outcome (finished, or the error and when), the wall time and its excess over the clean run,
the steps trained again after each restart, and what was lost (MLflow runs made, `train/loss` steps missing or
repeated). The suite covers the other rows of docs/cluster.md's fault matrix; these take a minute each.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.local import RAY, free_port  # noqa: E402
from pipelines import names  # noqa: E402
from pipelines.training import restarts  # noqa: E402

EVERY = 4  # run.checkpoint_every_steps
DRAIN_DEADLINE_S = 5
# Ray Train's own reaction times, shortened through its environment variables (the same ones tune a real cluster)
FAST_RAY_TRAIN = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
}


class Gate:
    """A TCP forwarder 127.0.0.1:port → `upstream` that can be closed: while closed, every open connection is cut
    and new ones are accepted and dropped at once (a network partition, as the client sees it)."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.open = upstream, True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src), _shut(dst)

    def close(self) -> None:
        self.open = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            _shut(s)

    def reopen(self) -> None:
        self.open = True


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the other side


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a SQLite store, stoppable and restartable on the same port and store."""

    def __init__(self, work: Path):
        self.work, self.port = work, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.work}/mlflow.db",
                   "--artifacts-destination", str(self.work / "artifacts"), "--workers", "1"]  # fmt: skip
        log = (self.work / "mlflow-server.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {self.work / 'mlflow-server.log'}") from exc
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker, as a crash would
            self.proc.wait(timeout=30)


@dataclass
class Env:
    """What the cases share: the cluster, its servers and the smoke data."""

    cluster: object
    gate: Gate
    mlflow: MlflowServer
    bucket: str
    data: list[str]
    work: Path
    steps: int
    outage_s: float


class Watch:
    """A running case: its driver process and log, read for the workers' step lines."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def last_step(self) -> int:
        return restarts.last_step(self.text())

    def reach(self, step: int) -> int:
        """Wait until a worker has logged `step`; the last step logged by then."""
        self.wait(lambda: self.last_step() >= step, f"step {step}")
        return self.last_step()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what} (driver exit code {self.proc.poll()}): {self.log}")
            time.sleep(0.3)


def training_workers(env: Env) -> list:
    from ray.util.state import list_actors

    return list_actors(address=env.cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                             ("state", "=", "ALIVE")])  # fmt: skip


def fault_none(env: Env, watch: Watch) -> str:
    return "-"


def fault_worker_sigkill(env: Env, watch: Watch) -> str:
    at = watch.reach(2 * EVERY + 1)  # two checkpoints
    worker = training_workers(env)[0]
    os.kill(worker.pid, signal.SIGKILL)
    return f"SIGKILL worker pid {worker.pid} at step {at}"


def outage(watch: Watch, at_step: int, seconds: float, stop: Callable[[], None], start: Callable[[], None]) -> int:
    """Once the run reaches `at_step`: stop a service, wait `seconds`, start it again; the step it went down at."""
    at = watch.reach(at_step)
    stop()
    time.sleep(seconds)
    start()
    return at


def fault_mlflow_down(env: Env, watch: Watch) -> str:
    at = outage(watch, 2 * EVERY + 1, env.outage_s, env.mlflow.stop, env.mlflow.start)
    return f"server down from step {at} for {env.outage_s:.0f} s"


def fault_s3_down(env: Env, watch: Watch) -> str:
    at = outage(watch, 3 * EVERY - 1, env.outage_s, env.gate.close, env.gate.reopen)  # just before a checkpoint
    return f"S3 cut from step {at} for {env.outage_s:.0f} s"


def fault_preempted_replaced(env: Env, watch: Watch) -> str:
    at = watch.reach(2 * EVERY + 1)  # two checkpoints
    node_id = training_workers(env)[0].node_id
    node = next(n for n in env.cluster.list_all_nodes() if n.node_id == node_id)
    command = [RAY, "drain-node", "--address", env.cluster.address, "--node-id", node_id,
               "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed (benchmark)",
               "--deadline-remaining-seconds", str(DRAIN_DEADLINE_S)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    watch.wait(lambda: "Source: preemption" in watch.text(), "the preemption restart")
    env.cluster.remove_node(node, allow_graceful=False)
    env.cluster.add_node(num_cpus=1)
    return f"node drained at step {at}, removed, replaced"


CASES: dict[str, Callable[[Env, Watch], str]] = {
    "clean": fault_none,
    "worker-sigkill": fault_worker_sigkill,
    "mlflow-down": fault_mlflow_down,
    "s3-down": fault_s3_down,
    "preempted-replaced": fault_preempted_replaced,
}


def run_case(env: Env, name: str) -> dict[str, str]:
    overrides = [*env.data, f"run.storage_path={env.bucket}/{name}", f"tracking.tracking_uri={env.mlflow.uri}",
                 f"tracking.experiment=faults-{name}", "tracking.alias=", "scaling.min_workers=1",
                 "scaling.resize_interval_s=2", "scaling.data_cpus=1", f"train.max_steps={env.steps}",
                 "model.backbone.name=resnet10", "model.backbone.width=16", "train.log_every=1",
                 "train.eval_every_epochs=100", "train.num_logged_images=0", f"run.checkpoint_every_steps={EVERY}",
                 "run.max_failures=1", "run.max_preemption_failures=1"]  # fmt: skip
    command = [sys.executable, "pipelines/train.py", "--verbose", "--config", "configs/smoke.yaml"]
    command += [a for o in overrides for a in ("--set", o)]
    driver_env = {**os.environ, "RAY_ADDRESS": env.cluster.address, **FAST_RAY_TRAIN,
                  "RETINA_TEST_FAULTS": '{"step_delay_s": 0.3}'}  # fmt: skip
    log = env.work / f"{name}.log"
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=driver_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    watch = Watch(proc, log)
    try:
        fault = CASES[name](env, watch)
        code = proc.wait(timeout=600)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        proc.kill()
        fault, code = f"not injected: {exc}", proc.wait()
    seconds = time.monotonic() - started
    return {"case": name, "fault": fault, "seconds": f"{seconds:.0f}", **outcome(env, name, code, watch.text())}


def outcome(env: Env, name: str, code: int, text: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env.mlflow.uri)
    exp = client.get_experiment_by_name(f"faults-{name}")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    status = runs[0].info.status if len(runs) == 1 else f"{len(runs)} runs"
    steps = [m.step for r in runs for m in client.get_metric_history(r.info.run_id, names.TRAIN_LOSS)]
    missing = len(set(range(1, env.steps + 1)) - set(steps))
    repeated = len(steps) - len(set(steps))
    errors = re.findall(r"^\w*Error: .*$", text, flags=re.M)
    result = "finished" if code == 0 and status == "FINISHED" else f"exit {code}, {status}: {errors[-1:] or '?'}"
    return {"outcome": result, "redone": str(restarts.steps_redone(text)), "runs": str(len(runs)),
            "lost": "nothing" if missing == repeated == 0 and len(runs) == 1 else
                    f"{missing} steps missing, {repeated} repeated"}  # fmt: skip


def start_env(work: Path, steps: int, outage_s: float):
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    gate = Gate(("127.0.0.1", moto_port))
    # the nodes and the drivers inherit these: every S3 client of the run goes through the gate
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{gate.port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    import boto3

    boto3.client("s3").create_bucket(Bucket="faults")
    mlflow = MlflowServer(work)
    mlflow.start()
    head = {"num_cpus": 1, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    import ray

    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)  # the data is prepared on Ray
    try:
        data = smoke_data(work / "smoke-data")
    finally:
        ray.shutdown()
    return Env(cluster, gate, mlflow, "s3://faults/runs", data, work, steps, outage_s), moto


def smoke_data(root: Path) -> list[str]:
    from pipelines.config import load_config
    from pipelines.data.sample import ensure_sample_data

    paths = {"root": root, "train_shards": root / "shards/train", "val_shards": root / "shards/val"}
    overrides = [f"data.{k}={v}" for k, v in paths.items()]
    ensure_sample_data(load_config(REPO / "configs" / "smoke.yaml", overrides).data)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    cases = args.cases.split(",")
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases: {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="retina-faults-"))
    print(f"work folder (logs of every run): {work}", flush=True)
    env, moto = start_env(work, args.steps, args.outage_s)
    rows = []
    try:
        for name in cases:
            rows.append(run_case(env, name))
            print(f"{name}: {rows[-1]}", flush=True)
    finally:
        env.cluster.shutdown()
        env.mlflow.stop()
        moto.stop()
    clean = next((float(r["seconds"]) for r in rows if r["case"] == "clean"), None)
    print("\n| case | fault | outcome | wall s (vs clean) | steps redone per restart | lost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" (+{float(r['seconds']) - clean:.0f})" if clean is not None and r["case"] != "clean" else ""
        print(f"| {r['case']} | {r['fault']} | {r['outcome']} | {r['seconds']}{extra} | {r['redone']} | {r['lost']} |")


if __name__ == "__main__":
    main()
