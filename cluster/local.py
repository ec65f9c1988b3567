"""A single-machine Ray head node for `ray job submit`, bound to 127.0.0.1, with token authentication.

    python -m cluster.local start [--num-cpus 4] [--dashboard-port 8265]   # prints the addresses; Ctrl-C stops it
    # in another shell:
    RAY_AUTH_MODE=token RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit --address http://127.0.0.1:8265 \
        --working-dir . --runtime-env-json "$(python -m cluster.runtime_env)" -- python pipelines/train.py ...

Why a helper and not ``ray start`` + ``ray stop``: ``ray stop`` ends every Ray process on the machine (other
users', a test session's). `LocalHead` runs ``ray start --head --block`` in a new process session with its own
temp dir and every port chosen free, and `LocalHead.stop` ends exactly that process group, then any process
still naming its temp dir — never processes by name.

Ray 2.60's job API requires a token (RAY_AUTH_MODE=token); `ensure_auth_token` creates ``~/.ray/auth_token``
with ``ray get-auth-token --generate`` when there is none.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))  # the ray CLI of this interpreter's environment


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_auth_token(env: dict[str, str] | None = None) -> None:
    """Create ~/.ray/auth_token if missing (``ray get-auth-token --generate`` keeps an existing one)."""
    env = dict(os.environ if env is None else env, RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)


@dataclass
class LocalHead:
    process: subprocess.Popen
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    log_path: str
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def dashboard_url(self) -> str:
        """The job API address for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _leftovers(self) -> list[int]:
        """Processes whose command line names this head's temp dir (workers that left the process group)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline:
                pids.append(int(entry.name))
        return pids

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the head's process group, SIGKILL what remains after `grace` seconds, remove the temp dir.

        The grace is short on purpose: ``ray start --block`` ignores SIGTERM and its children take ~15 s to
        wind down; nothing of this throwaway head needs saving.
        """
        for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            for pid in self._leftovers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + timeout
            while time.time() < deadline and (self.process.poll() is None or self._leftovers()):
                time.sleep(0.5)
            if self.process.poll() is not None and not self._leftovers():
                break
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int = 4, dashboard_port: int | None = None, startup_timeout: float = 120.0) -> LocalHead:
    """Start ``ray start --head --block`` on 127.0.0.1 with token auth; return once the job API answers."""
    env = dict(os.environ, RAY_AUTH_MODE="token")
    # The job's entrypoint runs `python ...` on the head: make that this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ensure_auth_token(env)
    # Short path: Ray puts unix sockets under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rayh_", dir="/tmp")
    gcs_port, dashboard_port = free_port(), dashboard_port or free_port()
    log_path = os.path.join(temp_dir, "ray_start.log")
    ports = {
        "--port": gcs_port,
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats",
        *[str(x) for kv in ports.items() for x in kv],
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalHead(process, temp_dir, gcs_port, dashboard_port, log_path, env)
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if process.poll() is not None:
            text = Path(log_path).read_text(errors="replace")[-3000:]
            head.stop()
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{text}")
        try:
            urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2)
            return head
        except urllib.error.HTTPError:
            return head  # it answers (401 without a token is an answer)
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    head.stop()
    raise TimeoutError(f"the Ray head's job API did not answer on {head.dashboard_url} in {startup_timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Ray head on 127.0.0.1 with token auth until Ctrl-C")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("--num-cpus", type=int, default=4)
    start.add_argument("--dashboard-port", type=int, default=8265)
    args = parser.parse_args(argv)
    head = start_head(args.num_cpus, args.dashboard_port)
    print(f"Ray head up: job API {head.dashboard_url}, GCS {head.gcs_address}, temp dir {head.temp_dir}")
    print("submit with: RAY_AUTH_MODE=token RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit "
          f"--address {head.dashboard_url} --working-dir . --runtime-env-json \"$(python -m cluster.runtime_env)\" "
          "-- python pipelines/train.py --config configs/smoke.yaml")  # fmt: skip
    try:
        while head.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        head.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
