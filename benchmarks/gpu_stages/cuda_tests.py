"""Stage 1: the CUDA tests (`pytest -m gpu`) of the Triton focal-loss kernel, in a child pytest process.

Only the focal-loss test files are collected: the rest of tests/ imports Ray, MLflow and boto3, which the GPU
machine does not have. `-x` stops at the first failure and the stage then fails the whole run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_stages.common import Context, log, require

STAGE = "1 cuda-tests"
# found by name under tests/, wherever the suite's layout puts them
TEST_FILES = ("test_focal_loss_triton.py", "test_focal_loss_cuda.py")
XDIST_WORKERS = 4
TIMEOUT_S = 240.0  # cold Triton compiles of ~40 specialisations dominate: ~1 s each


def junit_counts(path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over the suites of a JUnit XML file (pytest's --junitxml)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def find_test_files(repo: Path) -> list[Path]:
    found = [sorted((repo / "tests").rglob(name)) for name in TEST_FILES]
    require(all(len(f) == 1 for f in found), f"expected one each of {TEST_FILES} under tests/, found {found}")
    return [f[0] for f in found]


def parallel_args(ctx: Context) -> list[str]:
    """4 pytest-xdist workers where the plugin is installed (the GPU machine's image has it): the ~40 cold Triton
    compiles and the fp64 oracles on CPU spread over them. One process in the dry run, where everything skips."""
    if ctx.dry_run or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(XDIST_WORKERS)]


def run(ctx: Context) -> None:
    xml = ctx.out / "pytest-gpu.xml"
    xml.unlink(missing_ok=True)  # never read an earlier run's report
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += [*parallel_args(ctx), *(str(p) for p in find_test_files(ctx.repo))]
    # No installed project on the GPU machine: the repo root on the path makes `retina` importable in the child.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ctx.repo), os.environ.get("PYTHONPATH")]))}
    timeout = max(30.0, min(TIMEOUT_S, ctx.budget.left() - 5))
    log(f"{STAGE}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=ctx.repo, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout[-6000:] + proc.stderr[-2000:]).strip()
    require(xml.exists(), f"pytest wrote no report (exit {proc.returncode}):\n{tail}")
    counts = junit_counts(xml)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    require(proc.returncode == 0, f"pytest -m gpu failed (exit {proc.returncode}, {counts}):\n{tail}")
    require(counts["tests"] > 0, f"pytest -m gpu collected no test:\n{tail}")
    r = ctx.report
    if ctx.dry_run:
        # without CUDA every gpu test skips itself; the dry run proves the selection and the report parsing
        r.info(STAGE, "gpu tests collected (all skip without CUDA)", counts["tests"])
        r.info(STAGE, "skipped", counts["skipped"])
        return
    require(counts["skipped"] == 0, f"{counts['skipped']} gpu tests skipped on a CUDA machine:\n{tail}")
    r.correct(STAGE, "gpu tests passed (parity, determinism, graphs)", passed, target="all, none skipped")
