"""Time to the first logged step of a training run: this checkout against an earlier commit, side by side.

    python benchmarks/first_step.py [--baseline fb3463e] [--config configs/demo.yaml] [--repeats 2]

Each run is the real command (`pipelines/train.py --config ...`) in its own process, with its own local Ray (own
temp folder), run folder, MLflow store and a cold Inductor cache (as on a fresh machine); the baseline runs from a
`git worktree` of `--baseline` with this environment's Python. A run is stopped once its console shows the first
logged step (train.log_every), and its MLflow run gives: the run's start → the first logged step (what a user
waits for; the MLflow timestamps), and ``startup/first_step_s`` (the run's start → the first optimizer step done;
absent before that metric existed).
The two sides alternate (baseline, this, baseline, this, ...) so that drift of the machine hits both, with
`--settle` seconds of rest after each run (a stopped run's processes take a while to exit); printed: each run, the
medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRST_STEP_METRIC = "startup/first_step_s"  # pipelines.names.STARTUP_FIRST_STEP_S (the baseline may predate it)
EXPERIMENT = "first-step"


def run_once(tree: Path, config: str, work: Path, name: str, timeout: float, settle: float) -> dict[str, float]:
    """Train `config` from source tree `tree` until its first logged step; return its two start-up figures."""
    tmp = work / f"ray-{name}"  # Ray's temp folder: this run's processes are found (and ended) by it
    tmp.mkdir()
    data = REPO / "data" / "sample"  # both sides read this checkout's sample shards (made on its first run)
    sets = [f"data.root={data}", f"data.train_shards={data}/shards/train", f"data.val_shards={data}/shards/val",
            f"run.name={name}", f"run.storage_path={work}/runs", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model_name=first-step-{name}"]  # fmt: skip
    command = [sys.executable, str(tree / "pipelines" / "train.py"), "--config", str(tree / config)]
    for s in sets:
        command += ["--set", s]
    env = dict(os.environ, RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    deadline, seen = time.monotonic() + timeout, False
    try:
        for line in proc.stdout:  # the console's progress line, e.g. "20:31:02 step 10/1500  epoch 1/20 ..."
            if re.search(r"\bstep +\d+/\d+", line):
                seen = True
                break
            if time.monotonic() > deadline:
                break
    finally:
        _stop(proc, tmp)
        time.sleep(settle)  # the stopped run's processes exit and free their CPU before the next run starts
    if not seen:
        raise RuntimeError(f"{name}: no step logged within {timeout:.0f} s (see its Ray logs in {tmp})")
    return _figures(work, name)


def _stop(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """End the training command (Ctrl-C first: it stops its local Ray), then anything still naming its Ray folder."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(ray_tmp) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _figures(work: Path, name: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")[0]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    first_logged = min(losses, key=lambda m: m.step)
    first_step = client.get_metric_history(run.info.run_id, FIRST_STEP_METRIC)
    return {
        "run start → first logged step (s)": (first_logged.timestamp - run.info.start_time) / 1000,
        "run start → first step done (s)": first_step[0].value if first_step else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="fb3463e", help="the commit to compare with (default: before #16)")
    parser.add_argument("--config", default="configs/demo.yaml", help="a config path inside the repository")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the first logged step")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds of rest after each run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retina-fs-"))
    baseline = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                   check=True, capture_output=True)  # fmt: skip
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    sides = {f"baseline {args.baseline}": baseline, f"this checkout ({head.stdout.strip()})": REPO}
    results: dict[str, list[dict[str, float]]] = {label: [] for label in sides}
    try:
        for r in range(args.repeats):
            for k, (label, tree) in enumerate(sides.items()):
                figures = run_once(tree, args.config, work, f"s{k}r{r}", args.timeout, args.settle)
                results[label].append(figures)
                print(f"{label}, run {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    (a, b) = results.values()
    print(f"\n{args.config}, median of {args.repeats} runs each\n")
    print(f"| | {' | '.join(sides)} | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key in a[0]:
        ma, mb = statistics.median(f[key] for f in a), statistics.median(f[key] for f in b)
        ratio = f"{mb / ma:.2f}" if ma == ma and ma else "-"  # NaN (no such metric in the baseline) has no ratio
        print(f"| {key} | {ma:.1f} | {mb:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
