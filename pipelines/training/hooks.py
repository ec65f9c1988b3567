"""The named parts of the worker loop (`pipelines.training.protocol.Hook`), in the order `default_hooks` runs them:

1. `FaultInjection`  test-only faults (RETINA_TEST_FAULTS): a raise at a step, a NaN loss, slow steps
2. `StallWatchdog`   no batch for run.stall_timeout_s → a clear error naming what waits and the cluster's resources
3. `MetricsLog`      the first step of each attempt, then the training metrics every train.log_every steps
4. `Checkpoints`     step checkpoints (run.checkpoint_every_steps / _minutes) and before a node's preemption
5. `Evaluation`      every train.eval_every_epochs epochs and at the end; scored in the background but the last
6. `SystemMetrics`   each node's CPU, memory (and GPU) into the run while the loop runs (tracking.system_metrics)

Each is small and keeps its own state; what they share is the `Loop` (step, position, parts, reporter).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import ray.train
import torch.distributed as dist

from pipelines import names
from pipelines.training.distributed import all_reduce, broadcast_buffers
from pipelines.training.evaluation import EvalResult, predict_split, score
from pipelines.training.metrics import MetricWindow
from pipelines.training.protocol import Decision, Hook
from pipelines.training.step import StepResult, autocast
from pipelines.training.watchdog import watched
from retina.evaluation import DEFAULT_BACKEND

if TYPE_CHECKING:
    from pipelines.training.loop import Loop

logger = logging.getLogger("retina.train")


def default_hooks(loop: Loop) -> list[Hook]:
    """The parts of every run, in the order they run at each point of a step."""
    return [FaultInjection(), StallWatchdog(loop), MetricsLog(loop), Checkpoints(), Evaluation(), SystemMetrics(loop)]


class FaultInjection(Hook):
    """Test-only faults, from RETINA_TEST_FAULTS on the driver (`pipelines.training.faults`); inert otherwise."""

    def before_step(self, loop: Loop) -> None:
        faults = loop.inputs.faults
        faults.maybe_fail(loop.step, loop.rank, loop.world)
        loop.inject_nan = loop.step == faults.nan_at_step


class StallWatchdog(Hook):
    """Every batch stream waits at most run.stall_timeout_s for its next batch, then fails the attempt with a
    `DataStallError` naming the split, the rank and the cluster's resources (charged to run.max_failures like any
    failure): a worker group whose input pipeline cannot run never waits forever."""

    def __init__(self, loop: Loop) -> None:
        self.timeout_s, self.rank = loop.cfg.run.stall_timeout_s, loop.rank

    def wrap_batches(self, batches: Iterator[Any], split: str) -> Iterator[Any]:
        return watched(batches, self.timeout_s, f"{split} batch for rank {self.rank}")


class MetricsLog(Hook):
    """The training metrics: at each attempt's first step the group it trains with (and on a fresh run the time to
    the first step and the initial loss), then every train.log_every steps the window's means over steps and ranks
    (`MetricWindow`), to MLflow and, on rank 0, the log."""

    def __init__(self, loop: Loop) -> None:
        self.window = MetricWindow(loop.parts.device, loop.world, loop.global_batch)
        self.first = True

    def after_step(self, loop: Loop, result: StepResult, decision: Decision) -> None:
        if self.first:
            self.first = False
            log_first_step(loop, result, fresh=loop.step == 1)
        self.window.add(result)
        t = loop.cfg.train
        if loop.step % t.log_every == 0 or loop.step == t.max_steps:
            loop.last_train = self.window.flush(loop.parts.lr, loop.epoch, t.grad_clip > 0)
            loop.tracker.log_metrics(loop.last_train, loop.step)
            if loop.rank == 0:
                logger.info("step %d/%d %s", loop.step, t.max_steps,
                            " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in loop.last_train.items()))  # fmt: skip


def log_first_step(loop: Any, result: StepResult, *, fresh: bool) -> None:
    """The group this attempt trains with (a run's history shows each resize); on a fresh run also the time to its
    first step and train/initial_loss, the first batch's loss before any update averaged over the ranks (one
    extra collective, once per run; a non-finite one is not logged)."""
    start = loop.step - 1  # the step the batch was taken at
    if fresh:
        loss = all_reduce(result.loss.detach().float().reshape(1), dist.ReduceOp.SUM) / loop.world
        loop.tracker.log_metrics({names.STARTUP_FIRST_STEP_S: time.time() - loop.inputs.run_started_at,
                                  names.TRAIN_INITIAL_LOSS: float(loss)}, 0)  # fmt: skip
    loop.tracker.log_events({names.TRAIN_WORLD_SIZE: loop.world, names.TRAIN_GLOBAL_BATCH: loop.global_batch}, start)


class Checkpoints(Hook):
    """A step checkpoint when run.checkpoint_every_steps or run.checkpoint_every_minutes (rank 0's clock: a vote)
    is reached, and a synchronous one as soon as Ray reports a node of the group draining for preemption (asked
    every train.log_every steps, a barrier at a step every rank shares). None at the last step: it is evaluated."""

    VOTES = ("checkpoint_due",)

    def __init__(self) -> None:
        self.preemption_saved = False  # the checkpoint for the preemption under way is taken

    def votes(self, loop: Loop, result: StepResult) -> Mapping[str, bool]:
        r, next_step = loop.cfg.run, loop.step + 1
        by_steps = r.checkpoint_every_steps > 0 and next_step % r.checkpoint_every_steps == 0
        elapsed = time.monotonic() - loop.reporter.last_checkpoint_time
        by_time = loop.rank == 0 and r.checkpoint_every_minutes > 0 and elapsed >= 60 * r.checkpoint_every_minutes
        return {"checkpoint_due": by_steps or by_time}

    def after_step(self, loop: Loop, result: StepResult, decision: Decision) -> None:
        t = loop.cfg.train
        preempted = (loop.step % t.log_every == 0 or loop.step == t.max_steps) and self._preemption_notice(loop)
        if (decision["checkpoint_due"] or preempted) and loop.step < t.max_steps:
            metrics = {**loop.last_train, names.STEP: loop.step, names.EPOCH: loop.epoch}
            loop.reporter.checkpoint(metrics, loop.state(), sync=preempted)

    def _preemption_notice(self, loop: Loop) -> bool:
        """True once per preemption: Ray reports a node of this group draining for preemption."""
        info = ray.train.get_preemption_info()
        if info is None:
            self.preemption_saved = False
            return False
        if self.preemption_saved:
            return False
        logger.warning("preemption notice: %s; checkpointing at step %d", info, loop.step)
        self.preemption_saved = True
        return True


class Evaluation(Hook):
    """COCO evaluation on the val split every train.eval_every_epochs epochs and at train.max_steps: every rank
    predicts its part, rank 0 gathers. The last one (or every one, with train.background_eval off) is scored here;
    the others in a background Ray task while training goes on, reported (metrics + the checkpoint written at the
    evaluated step) at the step every rank learns the score is in (a vote)."""

    VOTES = ("eval_scored",)

    def __init__(self) -> None:
        self.epoch_started = (time.perf_counter(), -1)  # (time, step) where the current epoch's timing began

    def before_train(self, loop: Loop) -> None:
        self.epoch_started = (time.perf_counter(), loop.step)

    def votes(self, loop: Loop, result: StepResult) -> Mapping[str, bool]:
        return {"eval_scored": loop.reporter.scored()}

    def after_step(self, loop: Loop, result: StepResult, decision: Decision) -> None:
        if decision["eval_scored"]:
            loop.reporter.flush()
        t = loop.cfg.train
        final = loop.step >= t.max_steps
        if final or (loop.epoch_ended and loop.epoch % t.eval_every_epochs == 0):
            started, first = self.epoch_started
            rate = (loop.step - first) * loop.global_batch / (time.perf_counter() - started)
            self.evaluate(loop, final, rate)
        if loop.epoch_ended:
            self.epoch_started = (time.perf_counter(), loop.step)

    def after_train(self, loop: Loop) -> None:
        loop.reporter.flush()  # (the last evaluation is scored in place: nothing is pending by now)

    def evaluate(self, loop: Loop, final: bool, epoch_images_per_s: float) -> None:
        t, start = loop.cfg.train, time.perf_counter()
        broadcast_buffers(loop.parts.model)  # every rank evaluates the model the checkpoint holds
        predictions = predict_split(loop.parts.model, loop.val_batches(), device=loop.parts.device,
                                    autocast=autocast(loop.parts.train.amp, loop.parts.device),
                                    num_samples=t.num_logged_images if final else 0)  # fmt: skip
        metrics = {**loop.last_train, names.STEP: loop.step, names.EPOCH: loop.epoch,
                   names.TRAIN_EPOCH_IMAGES_PER_S: epoch_images_per_s}  # fmt: skip
        if t.background_eval and not final:
            loop.reporter.defer(predictions, metrics, loop.state())
            loop.tracker.log_metrics({names.VAL_SECONDS: time.perf_counter() - start}, loop.step)
            return
        result = EvalResult(coco=None, num_images=0, num_detections=0)
        if predictions is not None:  # rank 0
            score_start = time.perf_counter()
            result = score(loop.reporter.ground_truth, predictions, list(loop.labels.coco_ids), DEFAULT_BACKEND)
            metrics[names.VAL_SCORE_SECONDS] = time.perf_counter() - score_start
        metrics[names.VAL_SECONDS] = time.perf_counter() - start
        loop.reporter.evaluation(result, metrics, loop.state())
        if loop.rank == 0:
            logger.info("epoch %d step %d: %s", loop.epoch, loop.step,
                        {k: round(v, 4) for k, v in result.metrics().items()})  # fmt: skip


class SystemMetrics(Hook):
    """Each node's CPU, memory, disk and network (and GPU, where MLflow can read it) into the run as
    ``system/<host>/<metric>`` series, from the loop's start to its end: MLflow's SystemMetricsMonitor on the node's
    local rank 0 only (psutil measures the whole machine: one monitor per node), sampling every
    tracking.system_metrics_interval_s; tracking.system_metrics: false turns it off.

    The monitor is made in a thread: MLflow's import and the run lookup cost ~1.5 s of CPU the first step would wait
    for. It stops at the end of the loop, or when the thread the loop ran in ends without getting there (Ray Train
    runs it in a thread of its own: an exception, a diverged loss), so a failed attempt's monitor never outlives it.
    A restarted attempt continues the series at the next step (resume_logging)."""

    def __init__(self, loop: Loop) -> None:
        t = loop.cfg.tracking
        local_rank = ray.train.get_context().get_local_rank()
        self.enabled = t.system_metrics and bool(loop.inputs.mlflow_run_id) and local_rank == 0
        self.interval_s = t.system_metrics_interval_s
        self._lock = threading.Lock()
        self._monitor: Any = None
        self._stopped = False

    def before_train(self, loop: Loop) -> None:
        if self.enabled and not self._stopped:
            args = (loop.inputs.tracking_uri, loop.inputs.mlflow_run_id, threading.current_thread())
            threading.Thread(target=self._watch, args=args, daemon=True, name="retina-system-metrics").start()

    def after_train(self, loop: Loop) -> None:
        self.stop()

    def _watch(self, tracking_uri: str, run_id: str, training: threading.Thread) -> None:
        try:
            monitor = _node_monitor(tracking_uri, run_id, self.interval_s)
        except Exception:  # metrics about the machine must never fail the training
            logger.warning("system metrics: cannot start MLflow's monitor", exc_info=True)
            return
        with self._lock:
            if self._stopped:  # the loop ended before the monitor was made
                return
            self._monitor = monitor
            monitor.start()
        training.join()
        self.stop()

    def stop(self) -> None:
        """Stop the monitor (once) and log the sample it took since its last point."""
        with self._lock:
            self._stopped = True
            monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
            last = monitor.aggregate_metrics()  # the sample of the interval the stop cut short
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()
        except Exception:
            logger.warning("system metrics: the monitor did not stop cleanly", exc_info=True)


def _node_monitor(tracking_uri: str, run_id: str, interval_s: float) -> Any:
    """MLflow's monitor of this machine, logging into `run_id` as system/<host>/<metric>."""
    import psutil
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    psutil.cpu_percent()  # the first reading is the use since the last call: prime it, or the first point reads 0
    return SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                node_id=socket.gethostname(), tracking_uri=tracking_uri)  # fmt: skip
