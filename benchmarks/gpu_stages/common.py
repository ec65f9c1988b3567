"""What every stage of the GPU check shares: the results table, the failure types, the time budget, timing.

A stage records its measurements as rows (stage, metric, value, target, status) into one `Report`; a wrong result
raises `CheckFailed` at once. A missed speed target is only a row with status "below target": speed depends on
the machine, a wrong number does not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


class CheckFailed(RuntimeError):
    """A wrong result (parity, NaN, a loss that does not fall, detections that differ): the run stops here."""


class BudgetExceeded(BaseException):
    """The whole run passed its time budget (raised by the runner's alarm). A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way (torch.compile wraps those) swallows it."""


class DeadlinePassed(BaseException):
    """An optional part ran past its own deadline (`soft_deadline`); the run goes on without it."""


@contextlib.contextmanager
def soft_deadline(seconds: float) -> Iterator[None]:
    """Raise DeadlinePassed in the main thread after `seconds`, for optional work such as a cold torch.compile,
    then hand SIGALRM back to the run's own budget alarm (runner.py) with its remaining time."""
    run_left = signal.alarm(0)  # seconds left on the run's alarm (0: none armed)
    previous = signal.getsignal(signal.SIGALRM)
    if run_left and run_left <= seconds:  # the run's alarm comes first anyway
        signal.alarm(run_left)
        yield
        return

    whole = max(1, int(seconds))

    def expire(signum, frame):
        raise DeadlinePassed(f"optional work stopped at its {whole} s deadline")

    start = time.monotonic()
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(whole)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if run_left:
            signal.alarm(max(1, run_left - int(time.monotonic() - start)))


def require(ok: bool, message: str) -> None:
    """Fail loudly: raise CheckFailed(message) unless `ok`."""
    if not ok:
        raise CheckFailed(message)


@dataclass
class Row:
    stage: str
    metric: str
    value: Any  # a number (JSON keeps it unformatted) or a short text
    unit: str = ""
    target: str = ""  # "" for figures that are only reported
    status: str = "info"  # pass | below target | not judged (dry run) | info | skipped | failed


@dataclass
class Report:
    dry_run: bool
    rows: list[Row] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {"status", "wall_s"}
    values: dict[str, Any] = field(default_factory=dict)  # figures one stage hands to another (img/s ...)

    def info(self, stage: str, metric: str, value: Any, unit: str = "") -> None:
        self.rows.append(Row(stage, metric, value, unit))

    def judge(self, stage: str, metric: str, value: float | None, unit: str, target: str, ok: bool | None) -> None:
        """A figure with a speed/size target. In a CPU dry run targets are printed, never judged."""
        if self.dry_run:
            status = "not judged (dry run)"
        elif ok is None or value is None:
            status = "n/a"
        else:
            status = "pass" if ok else "below target"
        self.rows.append(Row(stage, metric, value, unit, target, status))

    def correct(self, stage: str, metric: str, value: Any, unit: str = "", target: str = "") -> None:
        """A correctness figure that was already checked with `require` (so it passed)."""
        self.rows.append(Row(stage, metric, value, unit, target, "pass"))

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {**meta, "stages": self.stages, "rows": [asdict(r) for r in self.rows]}


class Budget:
    """Wall-clock budget of the whole run: stages size their optional parts by what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Context:
    device: torch.device
    dry_run: bool
    out: Path
    repo: Path
    budget: Budget
    report: Report

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_ms(fn: Callable[[], Any], device: torch.device, *, iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call over `iters` back-to-back calls. On CUDA, events around the whole run and no
    sync in between: the host queues work ahead, so the figure is the device's time unless the host is slower."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def is_h100_class(name: str) -> bool:
    """The ≥ 100 img/s target is stated for H100-class GPUs (H100, H200, H800, GH200 and newer B-series)."""
    return any(tag in name for tag in ("H100", "H200", "H800", "GH200", "B200", "B300", "GB200"))


def versions(device: torch.device) -> dict[str, Any]:
    """What the run ran with: the GPU machine has its own Python and torch, not the project's pins."""
    import numpy
    import PIL
    import torchvision

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": cpu_count(),
        "platform": platform.platform(),
    }
    for name in ("triton", "pytest"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = props.name
        out["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["gpu_capability"] = f"{props.major}.{props.minor}"
        out["gpu_multiprocessors"] = props.multi_processor_count
    else:
        out["gpu"] = None
    return out


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use, not the host's
    except AttributeError:
        return os.cpu_count() or 1


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.3g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def format_table(rows: list[Row]) -> str:
    """One plain-text table, the stages in order."""
    header = ("stage", "metric", "value", "target", "result")
    body = [(r.stage, r.metric, f"{_fmt(r.value)} {r.unit}".strip(), r.target, r.status) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in body]
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written after every stage (atomically), so a run killed later still leaves what it measured."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the final table only."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
