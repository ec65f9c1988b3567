"""benchmarks/gpu_check.py without a CUDA device: one line and exit 0; `--cpu-dry-run` runs every stage at tiny
sizes on CPU and writes the JSON with all five stages (what proves the script before it meets a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("1 cuda-tests", "2 focal-loss", "3 train-step", "4 demo-train", "5 decode")
# hide any GPU, so that this checks the no-CUDA behaviour on every machine
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_without_cuda_it_skips_with_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "no CUDA" in lines[0], proc.stdout
    assert not (tmp_path / "out").exists()  # a clean skip writes nothing


def test_cpu_dry_run_runs_every_stage(tmp_path):
    proc = _run("--out", str(tmp_path), "--cpu-dry-run", timeout=420)  # ~30 s on 2 idle cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-dry-run" and report["ok"] is True and report["exit_code"] == 0
    assert {s: report["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "ok")
    rows = report["rows"]
    assert {r["stage"] for r in rows} >= set(STAGES)
    targeted = [r for r in rows if r["target"]]
    assert {r["status"] for r in targeted} <= {"pass", "not judged (dry run)"}  # correctness rows pass
    assert any(r["status"] == "not judged (dry run)" for r in targeted)  # speed targets printed, not judged
    for key in ("python", "torch", "torchvision", "triton", "cuda", "gpu"):
        assert key in report["versions"]
    assert "GPU check on CPU dry run" in proc.stdout and "all results right" in proc.stdout
    assert (tmp_path / "pytest-gpu.xml").exists()


def test_skip_names_a_stage(tmp_path):
    proc = _run("--out", str(tmp_path), "--cpu-dry-run", "--skip", "nonsense", timeout=60)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr
