"""Which Ray a command uses (cluster/connect.py): with RAY_ADDRESS unset, a local Ray of its own, whatever Ray's
current-cluster file names; with RAY_ADDRESS set, that cluster, unsized, said in one line.

Ray finds that file at $RAY_TMPDIR/ray/ray_current_cluster (ray/_common/utils.py: get_default_system_temp_dir,
get_ray_address_file), so every command here runs as a subprocess with RAY_TMPDIR in a fresh folder: the
machine's /tmp/ray is never read or written, and the test session's own Ray is left as it is.
"""

from __future__ import annotations

import os
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


def test_smoke_training_beside_a_running_ray(ray_local, smoke_data, ray_tmpdir, tmp_path):  # noqa: F811
    """The current-cluster file names a Ray that is up (the test session's, one of several instances on the
    machine): `train.py` trains on a local Ray of its own, exit 0, no traceback."""
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(ray_local.get_runtime_context().gcs_address)
    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={tmp_path}/runs",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "train.max_steps=2",  # which Ray is tested, not the training
    ]
    args = ["pipelines/train.py", "--config", "configs/smoke.yaml", *[a for o in overrides for a in ("--set", o)]]
    proc = run(args, ray_tmpdir, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    assert "done in" in output
    assert len(sessions(ray_tmpdir)) == 1
