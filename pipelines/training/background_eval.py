"""COCOeval off the training path: rank 0 hands an evaluation's gathered predictions to a Ray task and trains on.

Why: scoring runs on one CPU core while every rank waits at the report. With faster-coco-eval it takes ~5 s for
COCO val (5,000 images x 80 classes x 100 detections) on this machine, with pycocotools ~50 s; inference is
shared by the ranks, scoring is not. In the background the ranks wait only for the hand-over (numpy arrays into
the object store: ~0.1 s at that size; benchmarks/coco_eval.py measures both).

How the result comes back (pipelines/training/loop.py): every rank knows an evaluation is pending; rank 0 polls
`ready()` once per step and the answer rides on the step's all-reduce, so all ranks call the deferred
``ray.train.report`` at the same step, with the val metrics of the evaluated step and the checkpoint written
when it was evaluated (so Ray's checkpoint ranking and Tune/ASHA see each evaluation's val/AP, a few steps late).
Another evaluation, a step checkpoint or the end of training first waits for the pending one.

The task asks for `num_cpus` CPUs (train.eval_task_cpus, default 0: on a CPU-only cluster whose cores the
workers and Ray Data hold, a task asking for one would only start when training ends).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from pipelines.training.evaluation import EvalResult, Predictions, score


def _score_task(gt: dict[str, Any], predictions: Predictions, coco_ids: list[int], backend: str) -> tuple:
    start = time.perf_counter()
    return score(gt, predictions, coco_ids, backend), time.perf_counter() - start


@dataclass
class Finished:
    """A pending evaluation's result, with what was kept for it at submission."""

    result: EvalResult
    step: int
    extra: Any  # whatever the caller attached (metrics so far, the checkpoint written at that step)
    seconds: float  # the task's scoring time


class BackgroundEvaluator:
    """At most one pending evaluation (rank 0): `submit`, poll `ready`, collect with `wait`."""

    def __init__(self, gt: dict[str, Any], coco_ids: list[int], *, backend: str, num_cpus: float = 0) -> None:
        self._gt = ray.put(gt)  # once per worker: every evaluation's task reads the same ground truth
        self._coco_ids, self._backend = list(coco_ids), backend
        self._task = ray.remote(_score_task).options(num_cpus=num_cpus, max_retries=1)
        self._pending: tuple[ray.ObjectRef, int, Any] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(self, step: int, predictions: Predictions, extra: Any) -> None:
        """Start scoring one evaluation's gathered predictions (taken at `step`); `extra` comes back with the
        result."""
        if self._pending is not None:
            raise RuntimeError("an evaluation is already pending: wait() for it first")
        ref = self._task.remote(self._gt, predictions, self._coco_ids, self._backend)
        self._pending = (ref, step, extra)

    def ready(self) -> bool:
        """Whether the pending evaluation's result has arrived (never blocks)."""
        if self._pending is None:
            return False
        done, _ = ray.wait([self._pending[0]], timeout=0)
        return bool(done)

    def wait(self) -> Finished:
        """The pending evaluation's result (blocks until it is there); raises what the task raised."""
        if self._pending is None:
            raise RuntimeError("no evaluation is pending")
        ref, step, extra = self._pending
        self._pending = None
        result, seconds = ray.get(ref)
        return Finished(result, step, extra, seconds)
