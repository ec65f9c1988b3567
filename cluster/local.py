"""A single-machine Ray head node for `ray job submit`, bound to 127.0.0.1, with token authentication.

    python -m cluster.local start [--num-cpus 4] [--dashboard-port 8265]   # prints the addresses; Ctrl-C stops it
    # in another shell (the checkout's .rayignore decides what the job uploads):
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python pipelines/train.py --config configs/smoke.yaml

Why a helper and not ``ray start`` + ``ray stop``: ``ray stop`` ends every Ray process on the machine (other
users', a test session's). `LocalHead` runs ``ray start --head --block`` in a new process session with its own
temp dir, and `LocalHead.stop` ends exactly that process group, then any process still naming its temp dir —
never processes by name. The command stops the head on SIGINT (Ctrl-C), SIGTERM and SIGHUP alike.

Ports: Ray picks every port itself (port 0: the GCS, the dashboard unless one is asked for, the dashboard
agent; its defaults for the rest), and `start_head` reads back what it chose. The one exception is the Ray
Client server, which Ray starts on 10001 and refuses port 0 for: it gets a port picked here, and a start that
loses that port to another process before Ray binds it is retried whole.

The job client needs RAY_AUTH_MODE=token in its environment: Ray 2.60's job client sends the token of
``~/.ray/auth_token`` only when that variable says token mode (see docs/cluster.md). `ensure_auth_token`
creates the file with ``ray get-auth-token --generate`` when there is none.
"""

from __future__ import annotations

import argparse
import os
import re
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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What `ray start` prints once the dashboard is up, with the port it bound (port 0 asks Ray to pick one).
_DASHBOARD_LINE = re.compile(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'")


def free_port() -> int:
    """A port that was free a moment ago (another process may take it before the caller binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_token(env: dict[str, str]) -> bool:
    """Whether Ray finds a token without us: $RAY_AUTH_TOKEN, else the file at $RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (the places Ray 2.60's token loader reads, in that order)."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def ensure_auth_token(env: dict[str, str] | None = None) -> None:
    """Create ~/.ray/auth_token if Ray finds no token (``ray get-auth-token --generate``; skipped when there is one,
    since the CLI costs ~2 s of imports on every head start)."""
    env = dict(os.environ if env is None else env, RAY_AUTH_MODE="token")
    if not _has_token(env):
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of `pid` from /proc/PID/stat; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name
    except OSError:
        return None
    return fields[0], int(fields[2])  # state, ppid, pgrp, ...


@dataclass
class LocalHead:
    process: subprocess.Popen  # `ray start --head --block`, leader of its own process group
    temp_dir: str
    log_path: str
    gcs_address: str = ""  # host:port, as Ray wrote it to the temp dir's ray_current_cluster
    dashboard_url: str = ""  # the job API address for ``ray job submit --address``
    client_port: int = 0  # the Ray Client server's (the one port not picked by Ray)
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def processes(self) -> list[int]:
        """Every live process of this head: its process group, and any process naming its temp dir (one that
        left the group)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            stat = _stat(int(entry.name))
            if stat is None or stat[0] == "Z":  # gone, or a zombie waiting for its parent: nothing to stop
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if stat[1] == self.process.pid or self.temp_dir in cmdline:
                pids.append(int(entry.name))
        return pids

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM the head's processes, SIGKILL what remains after `grace` seconds, remove the temp dir.

        The grace is short on purpose: the dashboard's processes leave within it, but the GCS, the raylet and
        ``ray start --block`` itself take many seconds to wind down after SIGTERM, and nothing of this
        throwaway head needs saving (its object store's shared memory goes with its processes).
        """
        for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + timeout
            while time.time() < deadline and (self.process.poll() is None or self.processes()):
                time.sleep(0.2)
            if self.process.poll() is not None and not self.processes():
                break
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class StartFailed(RuntimeError):
    """``ray start`` exited before the head was up (the message holds the end of its log)."""


def _launch(num_cpus: int, dashboard_port: int, env: dict[str, str]) -> LocalHead:
    # Short path: Ray puts unix sockets under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rayh_", dir="/tmp")
    log_path = os.path.join(temp_dir, "ray_start.log")
    client_port = free_port()
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats",
        "--port", "0", "--dashboard-port", str(dashboard_port), "--dashboard-agent-listen-port", "0",
        "--ray-client-server-port", str(client_port),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return LocalHead(process, temp_dir, log_path, client_port=client_port, env=env)


def _listening_sockets(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl, local_address, rem_address, st, ..., inode (field 9)
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def _listens(pids: list[int], port: int) -> bool:
    """Whether one of `pids` holds a socket listening on `port`."""
    inodes = _listening_sockets(port)
    for pid in pids if inodes else []:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            return True
    return False


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # 401 without a token is an answer
    except (urllib.error.URLError, OSError):
        return False
    return True


def _wait_until_up(head: LocalHead, deadline: float) -> None:
    """Read back the addresses Ray chose, then wait until the job API answers and the Ray Client server listens.

    The client server is the one component whose port is picked here: if another process took the port first,
    it fails to bind and ``ray start --block`` ends the whole head, but only after the job API is already up.
    """
    address_file = Path(head.temp_dir, "ray_current_cluster")  # `ray start` writes it once the node is up
    while time.time() < deadline:
        if head.process.poll() is not None:
            text = Path(head.log_path).read_text(errors="replace")[-3000:]
            raise StartFailed(f"ray start exited with {head.process.returncode}:\n{text}")
        if not head.dashboard_url:
            found = _DASHBOARD_LINE.search(Path(head.log_path).read_text(errors="replace"))
            if found and address_file.exists():
                head.dashboard_url, head.gcs_address = found.group(1), address_file.read_text().strip()
        if (
            head.dashboard_url
            and _answers(f"{head.dashboard_url}/api/version")
            and _listens(head.processes(), head.client_port)
        ):
            return
        time.sleep(0.2)
    text = Path(head.log_path).read_text(errors="replace")[-3000:]  # the caller's stop() removes the file
    raise TimeoutError(f"the Ray head in {head.temp_dir} was not up in time; the end of its log:\n{text}")


def start_head(
    num_cpus: int = 4, dashboard_port: int | None = None, startup_timeout: float = 120.0, attempts: int = 3
) -> LocalHead:
    """Start ``ray start --head --block`` on 127.0.0.1 with token auth; return once the job API answers and the
    Ray Client server listens (`_wait_until_up`).

    `dashboard_port`: None or 0 lets Ray pick one (read back into `LocalHead.dashboard_url`). A start whose
    ``ray start`` exits early (a port taken between the pick and Ray's bind) is retried up to `attempts` times;
    a head that does not come up in `startup_timeout` seconds is not.
    """
    env = dict(os.environ, RAY_AUTH_MODE="token")
    # The job's entrypoint runs `python ...` on the head: make that this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # a head of its own, whatever cluster the caller's shell points at
    ensure_auth_token(env)
    if dashboard_port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", dashboard_port))
            except OSError:
                raise StartFailed(f"port {dashboard_port} is taken: choose another --dashboard-port") from None
    for attempt in range(1, attempts + 1):
        head = _launch(num_cpus, dashboard_port or 0, env)
        try:
            _wait_until_up(head, time.time() + startup_timeout)
            return head
        except StartFailed as exc:
            head.stop()
            if attempt == attempts:
                raise
            print(f"ray start failed (attempt {attempt} of {attempts}), starting again: {exc}", file=sys.stderr)
        except BaseException:  # a timeout, Ctrl-C or SIGTERM mid-start: leave nothing running
            head.stop()
            raise
    raise AssertionError("unreachable")


class _Stop(BaseException):
    """Raised in the main thread by a stop signal (not an Exception: nothing on the way may swallow it)."""


def _on_stop_signal(signum: int, frame: object) -> None:
    for sig in STOP_SIGNALS:  # one stop at a time: a second Ctrl-C must not cut the first one short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Ray head on 127.0.0.1 with token auth until Ctrl-C")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start")
    start.add_argument("--num-cpus", type=int, default=4)
    start.add_argument("--dashboard-port", type=int, default=8265, help="0: a free port Ray picks")
    args = parser.parse_args(argv)
    # Python's default SIGTERM/SIGHUP end this process at once, without the `finally` below: the head, in its
    # own process session, would outlive it. Every stop signal takes the same way out instead.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)
    head = None
    try:
        head = start_head(args.num_cpus, args.dashboard_port)
        print(f"Ray head up: job API {head.dashboard_url}, GCS {head.gcs_address}, temp dir {head.temp_dir}, "
              f"process group {head.process.pid}")  # fmt: skip
        print(f"submit with: RAY_AUTH_MODE=token ray job submit --address {head.dashboard_url} --working-dir . "
              "-- python pipelines/train.py --config configs/smoke.yaml", flush=True)  # fmt: skip
        while head.process.poll() is None:
            time.sleep(1)
        tail = Path(head.log_path).read_text(errors="replace")[-3000:]  # stop() removes the temp dir
        print(f"ray start exited with {head.process.returncode}:\n{tail}", file=sys.stderr)
        return 1
    except StartFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"{stop}: stopping the Ray head", flush=True)
        return 0
    finally:
        for sig in STOP_SIGNALS:  # nothing may interrupt the stop itself
            signal.signal(sig, signal.SIG_IGN)
        if head is not None:
            head.stop()


if __name__ == "__main__":
    sys.exit(main())
