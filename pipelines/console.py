"""What a person watching a command sees: the driver's own lines only, in order, with progress and an ETA.

Ray's output (its workers' logs, Ray Data's execution plans, Train's per-report lines) stays in Ray's log files
unless --verbose: the workers log their metrics to MLflow, and `TrainingProgress` reads them back from the run
every few seconds and prints one line per twentieth of the run and one per evaluation:

    13:05:41 step  375/1500  epoch  5/20  elapsed 1m52s  ETA 5m36s  33.4 img/s  loss 0.8712  lr 0.001
    13:06:02 evaluated at step 300: AP 0.104  AP50 0.213  AP75 0.091  (3.4 s)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.ray_compat import RAY_DATA_PROGRESS_LOGGER
from pipelines import names

logger = logging.getLogger("retina")

REPO = Path(__file__).resolve().parents[1]  # the checkout (its Makefile's `ui` serves REPO/mlflow.db)

# Library loggers that narrate their internals at INFO; a person running a command wants our lines.
CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "botocore", "filelock",
                  "optuna")  # fmt: skip


_verbose = False


def setup(verbose: bool = False) -> None:
    """Our lines as "HH:MM:SS message" on stderr; the chatty libraries at WARNING unless `verbose`."""
    global _verbose
    _verbose = verbose
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    if not verbose:
        # MLflow configures its loggers when it is imported, from this variable; and it draws a download
        # progress bar for every artifact it fetches (logging a model fetches several)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet_libraries()


# Warnings that describe a choice this project made on purpose, with nothing for the user to do: kept to errors.
# Ray Data: "Progress bars disabled" (the commands turn them off: per-operator bars drown the progress lines).
EXPECTED_WARNINGS = (RAY_DATA_PROGRESS_LOGGER,)


def quiet_libraries() -> None:
    """The chatty libraries' loggers at WARNING (INFO with --verbose). Call again after importing Ray Data or
    Optuna: they set their own levels when first used."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if _verbose else logging.WARNING)
    for name in EXPECTED_WARNINGS:
        logging.getLogger(name).setLevel(logging.INFO if _verbose else logging.ERROR)


def is_verbose() -> bool:
    """Whether the command was asked for Ray's own output too (--verbose): the workers' logs reach the driver."""
    return _verbose


def mlflow_ui(tracking_uri: str, experiment_id: str = "", run_id: str = "") -> str:
    """How to look at a run in the MLflow UI: the page itself for a tracking server, else the command that serves
    the store (``make ui`` for the checkout's own mlflow.db, which is what it serves) and the run's page."""
    page = f"/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id and run_id else ""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/") + page
    local = f"http://127.0.0.1:5000{page}"
    if tracking_uri == f"sqlite:///{REPO / 'mlflow.db'}" and (REPO / "Makefile").exists():
        return f"make ui (in {REPO}), then {local}"
    if tracking_uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1, then {local}"
    return tracking_uri


def duration(seconds: float) -> str:
    """75 → '1m15s', 3700 → '1h01m'."""
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Plan:
    max_steps: int
    epochs: int  # with the full group (`TrainPlan.epochs`); an elastic run's smaller groups take more


class TrainingProgress(threading.Thread):
    """Polls the MLflow run the workers log into and prints progress lines (a daemon thread of the driver)."""

    def __init__(self, tracking_uri: str, run_id: str, plan: Plan, lines: int = 20, poll_s: float = 3.0):
        super().__init__(daemon=True, name="retina-progress")
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.plan, self.poll_s = MlflowClient(tracking_uri), run_id, plan, poll_s
        self.every = max(1, plan.max_steps // lines)  # a line per twentieth of the run
        self.stop_event = threading.Event()
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, step) of the first step seen: the ETA's base
        self.printed_step, self.printed_eval = -1, -1

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a flaky read of the store must not end the run; the next poll tries again
                logger.debug("progress poll failed", exc_info=True)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=self.poll_s + 5)

    def poll(self) -> None:
        metrics = self.client.get_run(self.run_id).data.metrics  # the latest value of each
        step = int(self._latest_step(names.TRAIN_LOSS))
        if step > 0 and self.first is None:
            self.first = (time.monotonic(), step)
        if step > self.printed_step and (step // self.every > self.printed_step // self.every or step == 1):
            logger.info(self.progress_line(step, metrics))
            self.printed_step = step
        eval_step = self._latest_step(names.VAL_AP)
        if eval_step > self.printed_eval:
            logger.info(self.eval_line(eval_step, metrics))
            self.printed_eval = eval_step

    def _latest_step(self, key: str) -> int:
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def progress_line(self, step: int, m: dict[str, float]) -> str:
        p = self.plan
        epoch = int(m.get(names.TRAIN_EPOCH, 0))
        elapsed = time.monotonic() - self.started
        eta = "?"
        if self.first is not None and step > self.first[1]:
            rate = (step - self.first[1]) / max(time.monotonic() - self.first[0], 1e-9)
            eta = duration((p.max_steps - step) / rate)
        return (f"step {step:>{len(str(p.max_steps))}}/{p.max_steps}  epoch {epoch:>2}/{p.epochs}  "
                f"elapsed {duration(elapsed)}  ETA {eta}  {m.get(names.TRAIN_IMAGES_PER_S, 0):.1f} img/s  "
                f"loss {m.get(names.TRAIN_LOSS, float('nan')):.4f}  lr {m.get(names.TRAIN_LR, 0):.3g}")  # fmt: skip

    @staticmethod
    def eval_line(step: int, m: dict[str, float]) -> str:
        aps = "  ".join(
            f"{k.split('/')[1]} {m[k]:.3f}" for k in (names.VAL_AP, names.VAL_AP50, names.VAL_AP75) if k in m
        )
        seconds = f"  ({m[names.VAL_SECONDS]:.1f} s)" if names.VAL_SECONDS in m else ""
        return f"evaluated at step {step}: {aps}{seconds}"
