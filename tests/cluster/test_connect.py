"""Which Ray a command uses (cluster/connect.py): with RAY_ADDRESS unset, a local Ray of its own, whatever Ray's
current-cluster file names; with RAY_ADDRESS set, that cluster, unsized, said in one line.

Ray finds that file at $RAY_TMPDIR/ray/ray_current_cluster (ray/_common/utils.py: get_default_system_temp_dir,
get_ray_address_file), so every command here runs as a subprocess with RAY_TMPDIR in a fresh folder: the
machine's /tmp/ray is never read or written, and the test session's own Ray is left as it is.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import free_port
from tests._train_helpers import REPO, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow

CONNECT = """
import logging, sys
import ray
from cluster.connect import connect_ray
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
connect_ray(cpus_needed=float(sys.argv[1]), dashboard=False, log_to_driver=False)
print("CLUSTER", ray.get_runtime_context().gcs_address, int(ray.cluster_resources()["CPU"]))
"""


@pytest.fixture
def ray_tmpdir():
    """A fresh RAY_TMPDIR, short (Ray puts unix sockets under it: 108-byte limit); no process may outlive it."""
    path = Path(tempfile.mkdtemp(prefix="rt_", dir="/tmp"))
    (path / "ray").mkdir()
    yield path
    deadline = time.monotonic() + 15  # a driver's ray.shutdown() may return before the last process is reaped
    while (left := _processes_naming(str(path))) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours (they name our folder): end them, then fail
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"processes of the command's local Ray outlived it: {left}"


def _processes_naming(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def run(args: list[str], ray_tmpdir: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmpdir)} | env
    return subprocess.run([sys.executable, *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def sessions(ray_tmpdir: Path) -> list[Path]:
    return sorted((ray_tmpdir / "ray").glob("session_2*"))


def test_stale_current_cluster_file_starts_a_local_ray(ray_tmpdir):
    """A head killed without `ray stop` left its address behind: the command starts its own Ray, sized."""
    stale = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(stale)
    proc = run(["-c", CONNECT, "6"], ray_tmpdir, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
    _, address, cpus = next(line for line in proc.stdout.splitlines() if line.startswith("CLUSTER")).split()
    assert address != stale and cpus == "6"  # what the caller asked for (its workers and decode CPUs)
    assert len(sessions(ray_tmpdir)) == 1  # its session lives in RAY_TMPDIR: a local Ray of its own


def test_ray_address_joins_that_cluster_unsized(ray_local, ray_tmpdir):
    """RAY_ADDRESS set: the session's Ray is joined as it is (4 CPUs, not the 6 asked for), one line says so."""
    address = ray_local.get_runtime_context().gcs_address
    proc = run(["-c", CONNECT, "6"], ray_tmpdir, timeout=120, RAY_ADDRESS=address)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
    assert f"CLUSTER {address} 4" in proc.stdout
    said = [line for line in proc.stderr.splitlines() if line.startswith("retina.cluster:")]
    assert said == [f"retina.cluster: joining the Ray cluster at RAY_ADDRESS={address} (sized by whoever started it)"]
    assert not sessions(ray_tmpdir)  # nothing was started


def _start(args: list[str], ray_tmpdir: Path, log: Path, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmpdir)} | env
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT)


def _signal_at_step(proc: subprocess.Popen, log: Path, sig: signal.Signals, step: int, steps: int) -> int:
    """Wait for `proc` to log `step`, send `sig`; its exit code."""
    try:
        deadline = time.monotonic() + 300
        while not re.search(rf"step +{step}/{steps} ", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_training_beside_a_running_ray_stopped_and_rerun(ray_local, smoke_data, ray_tmpdir, tmp_path):  # noqa: F811
    """An operator's machine: the current-cluster file names a Ray that is up (the test session's, one of several
    instances on the machine), and the run is stopped twice. `train.py` trains on a local Ray of its own each
    time. Ctrl-C at step 4, then SIGTERM at step 8: one line saying how to continue (no Python traceback), the
    MLflow run KILLED, no process of its Ray left (the fixture checks); Ctrl-C exits 130 (after SIGTERM Ray's core
    worker aborts the process as it shuts down, Ray 2.60, so that code is not checked). The same command a third
    time finishes the same MLflow run, continued from checkpoints, never from step 0."""
    from mlflow.tracking import MlflowClient

    from pipelines import names
    from pipelines.training.faults import ENV as FAULTS_ENV

    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(ray_local.get_runtime_context().gcs_address)
    steps, store = 12, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={tmp_path}/runs", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        f"train.max_steps={steps}", "run.checkpoint_every_steps=2", "train.num_logged_images=0", "tracking.alias=",
    ]  # fmt: skip
    args = ["pipelines/train.py", "--config", "configs/smoke.yaml", *[a for o in overrides for a in ("--set", o)]]
    hint = "train: interrupted: run the same command again to continue from the latest checkpoint\n"
    for sig, at in ((signal.SIGINT, 4), (signal.SIGTERM, 8)):
        log = tmp_path / f"{sig.name}.log"
        code = _signal_at_step(_start(args, ray_tmpdir, log, **{FAULTS_ENV: '{"step_delay_s": 0.5}'}), log, sig, at,
                               steps)  # fmt: skip
        output = log.read_text()
        assert code == 130 or sig == signal.SIGTERM, output[-3000:]
        assert "Traceback" not in output and hint in output, output[-3000:]
        runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
        assert [r.info.status for r in runs] == ["KILLED"], [(r.info.status, r.data.tags) for r in runs]
    proc = run(args, ray_tmpdir, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output and "(resumed)" in output, output[-5000:]
    assert len(sessions(ray_tmpdir)) == 3  # a local Ray of its own each time, none joined
    (run_,) = store.search_runs([e.experiment_id for e in store.search_experiments()])
    logged = [m.step for m in store.get_metric_history(run_.info.run_id, names.TRAIN_LOSS)]
    assert run_.info.status == "FINISHED" and max(logged) == steps and logged.count(2) == 1, logged
