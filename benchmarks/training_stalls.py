"""Where a training run waits instead of stepping: time to first step, epoch boundaries, evaluations, checkpoints.

    python benchmarks/training_stalls.py [--config configs/demo.yaml] [--steps 600] [--set KEY=VALUE ...]

Trains the config twice, one run after the other, each in its own process with its own Ray, MLflow store and a
cold Inductor cache (as on a fresh machine):
- "one after the other": train.background_eval=false (COCOeval on rank 0 while the ranks wait);
- "overlapped": the defaults (COCOeval in a background Ray task while training goes on).
Either way the input pipeline streams every epoch of the run (each rank's decode tasks run ahead across epoch
boundaries), so the epoch-boundary figure shows what is left of a stall there.
Then it reads both MLflow runs and prints, side by side with ratios: the time from the run's start to its first
optimizer step (startup/first_step_s), the extra time of a log window that crosses an epoch boundary (against
the median window), the steady and per-epoch images/s, the training stall per evaluation (val/seconds), the
checkpoint stall (checkpoint/seconds), the run's wall time and its final val/AP.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEQUENTIAL = ["train.background_eval=false"]


def train(config: str, steps: int, overrides: list[str], work: Path, name: str) -> float:
    """One training run in a subprocess; returns its wall seconds."""
    lr_steps = f"[{int(steps * 0.8)},{int(steps * 0.94)}]"  # the demo's schedule shape, scaled
    sets = [f"train.max_steps={steps}", f"train.lr_steps={lr_steps}", f"run.name={name}",
            f"run.storage_path={work}/runs", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
            "tracking.experiment=stalls", f"tracking.registered_model_name=stalls-{name}", *overrides]  # fmt: skip
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{name}"))
    command = [sys.executable, str(REPO / "pipelines" / "train.py"), "--config", config]
    for s in sets:
        command += ["--set", s]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def analyse(tracking_uri: str, name: str) -> dict[str, float]:
    """The stall figures of run `name` from its MLflow metric histories."""
    from mlflow.tracking import MlflowClient

    from pipelines import names

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("stalls")
    run = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")[0]

    def history(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    rates, epochs = history(names.TRAIN_IMAGES_PER_S), history(names.TRAIN_EPOCH)
    batch = history(names.TRAIN_GLOBAL_BATCH)
    evaluated = set(history(names.VAL_AP))
    steps = sorted(rates)
    windows = []  # (seconds, crosses an epoch boundary, holds an evaluation)
    for prev, step in zip(steps, steps[1:], strict=False):
        seconds = (step - prev) * batch[step] / rates[step]
        crosses = epochs[step] != epochs[prev]
        windows.append((seconds, crosses, any(prev < e <= step for e in evaluated)))
    plain = [s for s, crosses, ev in windows if not crosses and not ev]
    boundary = [s for s, crosses, ev in windows if crosses and not ev]
    median = statistics.median(plain)
    log_every = steps[1] - steps[0]
    steady_rate = log_every * batch[steps[-1]] / median
    extra = statistics.mean(boundary) - median if boundary else 0.0
    # an epoch's images/s: its steps at the steady rate plus what its boundary adds
    epoch_steps = steps[-1] / max(epochs.values())
    steady_epoch_s = epoch_steps / log_every * median
    return {
        "time to first step (s)": history(names.STARTUP_FIRST_STEP_S).get(0, float("nan")),
        "median log window (s)": median,
        "extra per epoch boundary (s)": extra,
        "steady images/s": steady_rate,
        "epoch images/s (steady + boundary)": steady_rate * steady_epoch_s / (steady_epoch_s + extra),
        "training stall per evaluation (s)": statistics.mean(history(names.VAL_SECONDS).values()),
        "COCOeval per evaluation (s)": statistics.mean(history(names.VAL_SCORE_SECONDS).values() or [0.0]),
        "checkpoint stall (s)": statistics.mean(history(names.CHECKPOINT_SECONDS).values()),
        "run wall time (s)": (run.info.end_time - run.info.start_time) / 1000,
        "final val/AP": run.data.metrics.get(names.VAL_AP, float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="retina-stalls-"))
    variants = {"one after the other": SEQUENTIAL, "overlapped": []}
    for k, (label, overrides) in enumerate(variants.items()):
        seconds = train(args.config, args.steps, overrides + args.set, work, f"v{k}")
        print(f"{label}: trained in {seconds:.0f} s", flush=True)
    results = [analyse(f"sqlite:///{work}/mlflow.db", f"v{k}") for k in range(len(variants))]
    print(f"\n{args.config}, {args.steps} steps, each run in its own Ray with a cold Inductor cache\n")
    print(f"| | {' | '.join(variants)} | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for key in results[0]:
        a, b = results[0][key], results[1][key]
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"| {key} | {a:.3g} | {b:.3g} | {ratio} |")


if __name__ == "__main__":
    main()
