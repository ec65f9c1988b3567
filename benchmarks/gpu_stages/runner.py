"""Runs the stages in order, stops at the first wrong result, prints the table and writes gpu_check.json."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from gpu_stages.common import Budget, BudgetExceeded, CheckFailed, Context, Report, format_table, log, versions
from gpu_stages.common import write_json as _write_json

# name -> (table label, module); the modules are imported when their stage starts, so a broken import is that
# stage's failure (reported like any other) rather than a crash before anything is written
STAGES: dict[str, tuple[str, str]] = {
    "cuda-tests": ("1 cuda-tests", "gpu_stages.cuda_tests"),
    "focal-loss": ("2 focal-loss", "gpu_stages.focal"),
    "train-step": ("3 train-step", "gpu_stages.step_bench"),
    "demo-train": ("4 demo-train", "gpu_stages.demo_train"),
    "decode": ("5 decode", "gpu_stages.decode"),
}
# Stage 3 runs last: its optional torch.compile measurement spends whatever is left of the time budget.
ORDER = ("cuda-tests", "focal-loss", "demo-train", "decode", "train-step")
HARD_KILL_GRACE_S = 30  # after the budget's alarm, a run that is stuck in native code is ended this much later


def _on_alarm(signum, frame) -> None:
    raise BudgetExceeded("the run passed its time budget")


def _watchdog(seconds: float, finished: threading.Event) -> None:
    # A signal handler runs only when the main thread returns to Python; a thread also fires while it is blocked
    # in native code (a hung kernel, a compiler). The JSON of the last finished stage is already on disk.
    if not finished.wait(seconds):
        print(f"gpu-check: hard time limit ({seconds:.0f} s), exiting with 3", file=sys.stderr, flush=True)
        os._exit(3)


def _run_stages(ctx: Context, skip: set[str], write) -> None:
    report = ctx.report
    for name in ORDER:
        label, module = STAGES[name]
        if name in skip:
            report.stages[label] = {"status": "skipped (--skip)"}
            report.info(label, "stage", "skipped (--skip)")
            continue
        log(f"stage {label} ({ctx.budget.elapsed():.0f} s elapsed)")
        report.stages[label] = {"status": "running"}
        t0 = time.monotonic()
        importlib.import_module(module).run(ctx)
        report.stages[label] = {"status": "ok", "wall_s": round(time.monotonic() - t0, 1)}
        report.info(label, "stage wall time", time.monotonic() - t0, "s")
        write()
    if "decode" not in skip:
        importlib.import_module("gpu_stages.decode").cores_per_gpu(ctx)


def run(out: Path, *, dry_run: bool, skip: set[str], budget_s: float, argv: list[str]) -> int:
    """0: every result right (speed targets may be missed); 1: a wrong result or an error; 3: over the budget."""
    out.mkdir(parents=True, exist_ok=True)
    if dry_run:
        # the CPU fused loss would compile C++ with Inductor first: minutes on a 2-core machine, nothing to prove
        os.environ.setdefault("RETINA_FOCAL_LOSS_NO_COMPILE", "1")
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    ctx = Context(device, dry_run, out, Path(__file__).resolve().parents[2], Budget(budget_s), Report(dry_run))
    meta: dict[str, Any] = {
        "mode": "cpu-dry-run" if dry_run else "gpu",
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": budget_s,
        "versions": versions(device),
    }

    def write() -> None:
        meta["wall_s"] = round(ctx.budget.elapsed(), 1)
        meta.setdefault("ok", None)
        _write_json(out / "gpu_check.json", ctx.report.to_json(meta))

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(budget_s)))
    finished = threading.Event()
    threading.Thread(target=_watchdog, args=(budget_s + HARD_KILL_GRACE_S, finished), daemon=True).start()
    code, error = 0, None
    try:
        _run_stages(ctx, skip, write)
    except CheckFailed as exc:
        code, error = 1, f"wrong result: {exc}"
    except BudgetExceeded as exc:
        code, error = 3, f"{exc} ({budget_s:.0f} s)"
    except Exception as exc:  # an error is a failure too: report it with its traceback, never a silent pass
        code, error = 1, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    finally:
        signal.alarm(0)
    _finish(ctx, meta, code, error, write)
    finished.set()
    return code


def _finish(ctx: Context, meta: dict[str, Any], code: int, error: str | None, write) -> None:
    report = ctx.report
    for label, stage in report.stages.items():
        if stage.get("status") == "running":
            stage["status"] = "failed"
            report.info(label, "FAILED", (error or "?").splitlines()[0][:200])
            report.rows[-1].status = "failed"
    for label, _ in STAGES.values():
        if label not in report.stages:  # after the stage that stopped the run
            report.stages[label] = {"status": "not run"}
            report.info(label, "stage", "not run")
    total = ctx.budget.elapsed()
    report.judge("total", "wall time", total, "s", f"<= {ctx.budget.seconds:.0f} s", total <= ctx.budget.seconds)
    report.rows.sort(key=lambda row: row.stage)  # stable: each stage's rows stay in the order it wrote them
    report.stages = dict(sorted(report.stages.items()))
    meta.update(ok=code == 0, exit_code=code, error=error)
    write()
    v = meta["versions"]
    where = v.get("gpu") or "CPU dry run (targets not judged)"
    print(
        f"\nGPU check on {where}: python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"triton {v['triton']}, CUDA {v['cuda']}\n"
    )
    print(format_table(report.rows))
    verdict = "all results right" if code == 0 else f"FAILED (exit {code}): {error}"
    print(f"\n{verdict}\nJSON: {ctx.out / 'gpu_check.json'}", flush=True)
