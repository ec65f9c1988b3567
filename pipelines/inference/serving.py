"""``mlflow models serve`` for a registered model as a child process on 127.0.0.1: started, waited for, stopped.

What the serving test (tests/pipelines/test_serving.py) and benchmarks/serving.py run; by hand it is

    mlflow models serve -m models:/retinanet-demo@champion --env-manager local -h 127.0.0.1 -p 5001

with the venv active (the command starts ``uvicorn`` from the PATH) and MLFLOW_TRACKING_URI set. The server and
its uvicorn child run in their own process group, so `stop` ends both and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's tail."""


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    started_s: float  # from the command's start to the first answered /ping

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2):
            return True
    except OSError:
        return False


def start(
    model_uri: str,
    tracking_uri: str,
    log: Path,
    *,
    port: int | None = None,
    timeout_s: float = 300,
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``mlflow models serve -m model_uri --env-manager local`` (this Python's environment, plus `env`) and
    wait until it answers /ping; ServerError with the log's tail when it exits or does not answer in `timeout_s`."""
    port = port or free_port()
    bin_dir = Path(sys.executable).parent  # the venv's mlflow and the uvicorn it runs
    env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    began = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, port, log, 0.0)
    while not _answers(server.url):
        if proc.poll() is not None or time.monotonic() - began > timeout_s:
            stop(server)
            tail = log.read_text()[-3000:]
            raise ServerError(f"mlflow models serve -m {model_uri} did not come up on port {port}:\n{tail}")
        time.sleep(0.25)
    server.started_s = time.monotonic() - began
    return server


def stop(server: Server, timeout_s: float = 30) -> None:
    """SIGTERM to the server's process group (mlflow and its uvicorn), SIGKILL if it has not ended in `timeout_s`."""
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=timeout_s)
    except ProcessLookupError:  # the whole group has ended already: only the exit status is left to collect
        server.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=timeout_s)
