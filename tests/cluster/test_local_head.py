"""The local head (cluster/local.py) with real `ray start` processes: ``python -m cluster.local start`` comes up
20 times out of 20 with the ports Ray chose, and SIGINT, SIGTERM or SIGHUP (in turn) stops every process of the
head each time; a start that loses its one pre-picked port is started again. Heads of 1 CPU: the start-up, not the
capacity, is tested."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import cluster.local as local
from cluster.local import LocalHead, StartFailed, start_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STARTS = 20


def check_up(dashboard_url: str, gcs_address: str, temp_dir: str) -> None:
    """The addresses read back are the head's: its job API answers there to our token, and the GCS port is the
    one Ray picked."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()  # start_head made sure it exists
    request = urllib.request.Request(f"{dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"})
    assert json.loads(urllib.request.urlopen(request, timeout=10).read())["ray_version"]
    gcs_port = next(Path(temp_dir, "session_latest").glob("gcs_server_port_*")).read_text().strip()
    assert gcs_address.endswith(f":{gcs_port}")


def check_up_then_stop(head: LocalHead) -> None:
    try:
        check_up(head.dashboard_url, head.gcs_address, head.temp_dir)
    finally:  # a failed check leaves no head behind
        head.stop()
    assert not head.processes() and not Path(head.temp_dir).exists()


def test_a_start_that_loses_its_port_is_started_again(monkeypatch):
    """The Ray Client server's port (the one picked before Ray binds it) is taken by another process in between:
    that `ray start` fails, and the start is made again with a new port."""
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        taken, picks = squatter.getsockname()[1], []
        real_free_port = local.free_port

        def free_port() -> int:
            picks.append(taken if not picks else real_free_port())
            return picks[-1]

        monkeypatch.setattr(local, "free_port", free_port)
        head = start_head(num_cpus=1, attempts=2)
    client_port = head.client_port
    check_up_then_stop(head)
    assert len(picks) == 2 and client_port == picks[1] != taken


def test_a_taken_dashboard_port_is_an_error_at_once():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(StartFailed, match="choose another --dashboard-port"):
            start_head(num_cpus=1, dashboard_port=squatter.getsockname()[1])


def processes_of(group: int, temp_dir: str) -> list[int]:
    """Live processes in process group `group` or naming `temp_dir` (what LocalHead.processes looks for)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] != "Z" and (int(stat[2]) == group or temp_dir in cmdline):
            pids.append(int(entry.name))
    return pids


UP = re.compile(r"Ray head up: job API (\S+), GCS (\S+), temp dir (\S+), process group (\d+)")
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start_and_stop_by_signal(sig: signal.Signals, log: Path) -> None:
    """`python -m cluster.local start` until its head is up (checked as `check_up`), then `sig` to the command:
    it exits 0 saying so, and no process of the head (by its process group or its temp dir) is left."""
    command = [sys.executable, "-m", "cluster.local", "start", "--num-cpus", "1", "--dashboard-port", "0"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    up = None
    try:
        deadline = time.monotonic() + 180
        while not (up := UP.search(log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        url, gcs, temp_dir, group = up.group(1), up.group(2), up.group(3), int(up.group(4))
        check_up(url, gcs, temp_dir)
        assert processes_of(group, temp_dir), "the head's processes were not found"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert f"{sig.name}: stopping the Ray head" in log.read_text()
        assert not processes_of(group, temp_dir), log.read_text()[-3000:]
        assert not Path(temp_dir).exists()
    finally:  # a failed start leaves nothing running: the command, then its head's processes (by group and dir)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if up:
            for pid in processes_of(int(up.group(4)), up.group(3)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_the_command_starts_and_a_stop_signal_stops_it_whole_every_time(tmp_path, capsys):
    """20 starts in a row, each stopped by the next of SIGTERM, SIGINT and SIGHUP: 20 heads up and stopped whole."""
    failures, started = [], time.monotonic()
    for i in range(STARTS):
        sig = SIGNALS[i % len(SIGNALS)]
        try:
            start_and_stop_by_signal(sig, tmp_path / f"local{i}.log")
        except Exception as exc:  # count them all, then report
            failures.append(f"start {i} ({sig.name}): {type(exc).__name__}: {str(exc)[-1500:]}")
    seconds = time.monotonic() - started
    retries = sum(p.read_text().count("ray start failed (attempt") for p in tmp_path.glob("local*.log"))
    with capsys.disabled():
        print(f"\n{STARTS - len(failures)}/{STARTS} heads up and stopped by a signal in {seconds:.0f} s "
              f"({seconds / STARTS:.1f} s each), {retries} start(s) made again")  # fmt: skip
    assert not failures, "\n".join(failures)
