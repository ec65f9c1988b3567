"""What losing a worker costs: train a config, SIGKILL one Ray Train worker process at a fraction of the run, and
measure the steps trained again and the wall time of the whole run.

    python benchmarks/worker_loss.py [--config configs/demo.yaml] [--at 0.8] [--set section.key=value ...]

The run is the real command (`pipelines/train.py`) in a subprocess with its own run name, folder and MLflow
store; this script watches its MLflow run, and once `train/loss` has reached `--at` × train.max_steps it kills
the newest RayTrainWorker process of that run (a descendant of the command: other Rays on the machine are left
alone). Printed: the step of the kill, the step the restarted group resumed from (its checkpoint), the steps
trained again (at most run.checkpoint_every_steps when the step checkpoints keep up), the run's wall time and
its final val/AP.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pipelines.config import load_config
from pipelines.names import RESUMED_FROM_TAG, TRAIN_LOSS, VAL_AP

REPO = Path(__file__).resolve().parent.parent


def newest_worker_pid(command_pid: int) -> int | None:
    """The most recently started RayTrainWorker process of the training command `command_pid`: its local Ray's
    raylet, and so every worker, descends from it. Another Ray on the machine (a search, a test session) has
    RayTrainWorkers too, and killing one of those would be another run's fault, not this run's."""
    try:
        processes = psutil.Process(command_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    workers = []
    for process in processes:
        try:
            if "ray::RayTrainWorker" in " ".join(process.cmdline()):
                workers.append((process.create_time(), process.pid))
        except psutil.Error:  # gone meanwhile
            continue
    return max(workers)[1] if workers else None


def latest_step(client, experiment: str) -> tuple[str | None, int]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return None, -1
    run_id = runs[0].info.run_id
    return run_id, max((m.step for m in client.get_metric_history(run_id, TRAIN_LOSS)), default=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--at", type=float, default=0.8, help="kill when this fraction of the steps is done")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    work = Path(tempfile.mkdtemp(prefix="retina-worker-loss-"))
    cfg = load_config(args.config, args.overrides)
    uri = f"sqlite:///{work}/mlflow.db"
    overrides = [*args.overrides, f"run.storage_path={work}/runs", f"tracking.tracking_uri={uri}", "tracking.alias="]
    command = [sys.executable, "pipelines/train.py", "--config", args.config]
    command += [a for o in overrides for a in ("--set", o)]
    started = time.monotonic()
    log = (work / "train.log").open("w")
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    client = MlflowClient(uri)
    kill_at, killed_step, run_id = int(args.at * cfg.train.max_steps), None, None
    while proc.poll() is None:
        time.sleep(2)
        run_id, step = latest_step(client, cfg.tracking.experiment)
        if killed_step is None and step >= kill_at and (pid := newest_worker_pid(proc.pid)) is not None:
            os.kill(pid, signal.SIGKILL)
            killed_step = step
            print(f"killed RayTrainWorker pid {pid} at logged step {step} ({time.monotonic() - started:.0f} s)")
    seconds = time.monotonic() - started
    if proc.returncode != 0 or run_id is None:
        raise SystemExit(f"training failed ({proc.returncode}); log: {work / 'train.log'}")
    run = client.get_run(run_id)
    resumed = int(run.data.tags.get(RESUMED_FROM_TAG, "-1"))
    print(f"config {args.config}: {cfg.train.max_steps} steps, checkpoint every {cfg.run.checkpoint_every_steps}")
    print(f"kill at logged step {killed_step}; resumed from the checkpoint at step {resumed}; "
          f"steps trained again: {killed_step - resumed} (up to train.log_every={cfg.train.log_every} more "
          f"were trained but not yet logged when the worker died)")  # fmt: skip
    print(f"wall time {seconds:.0f} s ({seconds / 60:.1f} min); final {VAL_AP} {run.data.metrics.get(VAL_AP, 0):.4f}")
    print(f"log: {work / 'train.log'}")


if __name__ == "__main__":
    main()
