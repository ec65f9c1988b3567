"""The per-worker training loop that Ray Train runs on every DDP worker (`train_func`).

Reads top to bottom: build the model and its optimizer → restore the latest checkpoint → open this rank's stream
of batches (every epoch of the run in one Ray Data execution, so no epoch starts with an empty pipeline) → for
each epoch: train one epoch (with a step checkpoint whenever ``run.checkpoint_every_steps``/``_minutes``
say so, or a node is about to be preempted), then evaluate, checkpoint and report when due (every
``train.eval_every_epochs`` and at the end).

Collectives per step: one all-reduce of a 4-flag tensor [non-finite loss or gradient, out of data, checkpoint due,
background evaluation scored]. It makes every rank stop together, both on a non-finite loss (no rank steps the
optimizer with NaN gradients, so no checkpoint can hold NaN weights) and when one rank's data part ends first (no
rank waits forever in a DDP gradient all-reduce that the others never join), and every rank checkpoint together
(rank 0's clock decides a time-based checkpoint), and report a background evaluation at the same step when rank 0
has its score. Once per log interval all ranks also ask Ray whether a node of the group is being preempted
(``ray.train.get_preemption_info``, a barrier).

Batch and lr when the world size changes (elastic runs): every worker keeps the per-worker batch of the full
group (``data.batch_size / scaling.num_workers``), so the global batch is that times the workers present, and
the lr follows it by the linear scaling rule; see docs/cluster.md.

A non-finite loss ends the run without raising: a raise would make Ray Train restart the workers from the
last checkpoint (FailureConfig), which replays the same steps into the same NaN. Instead every rank returns
``{NONFINITE_KEY: message}`` (naming the step and each rank's loss terms); the driver reads rank 0's return value
(``Result.return_value``), raises `NonFiniteLossError` and marks the MLflow run FAILED.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from pipelines import names
from pipelines.config import Config
from pipelines.data.datasets import make_collate_fn
from pipelines.data.shards import coco_gt_from_shards
from pipelines.tracking.logger import RunLogger
from pipelines.training.background_eval import BackgroundEvaluator
from pipelines.training.checkpoint import load_checkpoint, write_metrics
from pipelines.training.distributed import all_gather_objects, all_reduce, broadcast_buffers
from pipelines.training.evaluation import EvalResult, predict_split, score
from pipelines.training.faults import Faults
from pipelines.training.metrics import MetricWindow
from pipelines.training.reporting import log_evaluation, report, write_checkpoint
from pipelines.training.step import StepResult, TrainingParts, apply_update, autocast, forward_backward
from retina.data.coco import LabelMap
from retina.evaluation import DEFAULT_BACKEND
from retina.model import build_retinanet
from retina.typed_config import to_dict

logger = logging.getLogger("retina.train")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    last_train: dict[str, float] = field(default_factory=dict)  # the latest log window's metrics
    last_checkpoint_time: float = field(default_factory=time.monotonic)  # rank 0's clock
    preemption_saved: bool = False  # a just-in-time checkpoint was taken for the preemption under way
    pending_eval: tuple[int, int] | None = None  # (step, epoch) of an evaluation being scored in the background
    stepped: bool = False  # this attempt (start or restart of the worker group) has taken its first step


@dataclass
class Worker:
    """What one worker knows besides its training parts: the run config, its place in the group, its MLflow logger
    (active on rank 0 only), the label map and the test-only faults."""

    cfg: Config
    rank: int
    world: int
    tracker: RunLogger
    label_map: list[dict[str, Any]]  # [{"id", "name", "label"}]: stored with every checkpoint
    faults: Faults
    train_images: int  # in the train split (its manifest's count)
    run_started_at: float  # time.time() on the driver when the run started (time to first step)
    _gt: dict[str, Any] | None = None

    @functools.cached_property
    def labels(self) -> LabelMap:
        return LabelMap.from_json(self.label_map)

    @property
    def per_worker_batch(self) -> int:
        """The full group's per-worker batch, kept whatever the world size (see the module docstring)."""
        return self.cfg.data.batch_size // self.cfg.scaling.num_workers

    @property
    def global_batch(self) -> int:
        return self.per_worker_batch * self.world

    @property
    def epoch_steps(self) -> int:
        """Steps in one pass over the train split with this group (`epoch_steps`)."""
        return epoch_steps(self.train_images, self.world, self.per_worker_batch)

    @functools.cached_property
    def evaluator(self) -> BackgroundEvaluator:
        """Rank 0's scorer of background evaluations (`background_eval`), made at the first one."""
        return BackgroundEvaluator(self.ground_truth(), list(self.labels.coco_ids), backend=DEFAULT_BACKEND,
                                   num_cpus=self.cfg.train.eval_task_cpus)  # fmt: skip

    def ground_truth(self) -> dict[str, Any]:
        """The val split's COCO ground truth, read once (rank 0 asks for it at each evaluation)."""
        if self._gt is None:
            self._gt = coco_gt_from_shards(self.cfg.data.val_shards)
        return self._gt


def epoch_steps(images: int, world: int, per_worker_batch: int) -> int:
    """Optimizer steps in one pass over `images` train images: every rank gets an equal part of the rows (the train
    split is equal=True) and drops its last partial batch."""
    return max(1, (images // world) // max(1, per_worker_batch))


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config`: {"config": Config, "tracking_uri", "mlflow_run_id", "label_map": [{"id",
    "name", "label"}, ...], "faults": Faults, "train_images": int, "run_started_at": float}. Returns {"step": last
    step} (+ NONFINITE_KEY when it diverged)."""
    cfg: Config = config["config"]
    ctx = ray.train.get_context()
    tracker = RunLogger(config["tracking_uri"], config["mlflow_run_id"], enabled=ctx.get_world_rank() == 0)
    w = Worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), tracker, config["label_map"], config["faults"],
               config["train_images"], config["run_started_at"])  # fmt: skip
    if ray.train.torch.get_device().type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)

    model = build_retinanet(cfg.model)
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir)
        model.load_state_dict(state.model)
    if state is not None and state.step >= cfg.train.max_steps:
        logger.info("rank %d: the run already finished (step %d of %d)", w.rank, state.step, cfg.train.max_steps)
        return {names.STEP: state.step}

    collate = make_collate_fn(cfg.model.input)  # Ray's collate class form (plain callables are deprecated)
    train_data = ray.train.get_dataset_shard("train")  # "val" at the first evaluation: its split coordinator, a
    # new process, would otherwise start while the machine is busy starting everything else before the first step

    def train_batches() -> Any:  # one new execution of the train Dataset
        return train_data.iter_torch_batches(batch_size=w.per_worker_batch, collate_fn=collate, drop_last=True)

    first = train_batches()
    parts = TrainingParts.build(model, cfg.train, w.global_batch)
    progress = Progress()
    if state is not None:
        parts.restore(state)
        progress.step, progress.epoch = state.step, state.epoch
        logger.info("rank %d: resumed from %s at step %d, epoch %d", w.rank, checkpoint.path, state.step, state.epoch)
        tracker.set_tag(names.RESUMED_FROM_TAG, str(state.step))

    window = MetricWindow(parts.device, w.world, w.global_batch)
    stream = _look_ahead(first, parts.device, w)  # this rank's batches of every epoch in one Dataset execution
    while progress.step < cfg.train.max_steps:
        if stream is None:  # the first epoch, or the previous execution ran out of rows: a new execution
            stream = _look_ahead(train_batches(), parts.device, w)
        epoch_start, start_step = time.perf_counter(), progress.step
        diverged, out_of_data = train_one_epoch(parts, stream, w, progress, window)
        if diverged:
            finish_pending_eval(w, progress)  # the last good evaluation and its checkpoint still count
            tracker.set_tag(names.ERROR_TAG, diverged[:5000])
            return {names.NONFINITE_KEY: diverged, names.STEP: progress.step}
        stream = None if out_of_data else stream
        progress.epoch += 1
        if progress.epoch % cfg.train.eval_every_epochs == 0 or progress.step >= cfg.train.max_steps:
            epoch_rate = (progress.step - start_step) * w.global_batch / (time.perf_counter() - epoch_start)
            val_data = ray.train.get_dataset_shard("val")
            val_batches = val_data.iter_torch_batches(batch_size=cfg.data.val_batch_size, collate_fn=collate)
            evaluate_and_report(parts, val_batches, w, progress, epoch_rate)
    finish_pending_eval(w, progress)  # (the last evaluation is scored in place: nothing is pending by now)
    return {names.STEP: progress.step}


def train_one_epoch(
    parts: TrainingParts, stream: Iterator[tuple[dict[str, torch.Tensor], bool]], w: Worker, progress: Progress,
    window: MetricWindow,
) -> tuple[str | None, bool]:  # fmt: skip
    """Take one epoch's steps (`Worker.epoch_steps`, or until train.max_steps) from `stream`; log every
    train.log_every steps and checkpoint when due. Returns (None, or the non-finite-loss message when any rank's
    loss or gradient stopped being finite; whether some rank's stream ran out of rows)."""
    t = w.cfg.train
    parts.model.train()
    for taken, (batch, is_last) in enumerate(stream, start=1):
        w.faults.maybe_fail(progress.step, w.rank, w.world)
        result = forward_backward(parts, batch, inject_nan=progress.step == w.faults.nan_at_step)
        # The step's one collective: stop on a non-finite value anywhere, when any rank's data part ends, and
        # checkpoint after this step when it is due by steps or by rank 0's clock.
        host = [float(is_last), float(_checkpoint_due(w, progress)), float(_eval_scored(w, progress))]
        # [non-finite, out of data, checkpoint due, background evaluation scored]
        flags = all_reduce(torch.cat([result.bad.float().reshape(1), torch.tensor(host, device=parts.device)]))
        if not progress.stepped:  # this attempt's first step: logged after it, not before (`RunLogger`)
            _log_first_step(w, result, progress)
        if bool(flags[0]):
            message = _nonfinite_message(progress.step, result)
            logger.error("rank %d: %s", w.rank, message)
            return message, False
        apply_update(parts)
        progress.step += 1
        window.add(result)
        preempted = False
        if progress.step % t.log_every == 0 or progress.step == t.max_steps:
            progress.last_train = window.flush(parts.lr, progress.epoch + 1, t.grad_clip > 0)
            w.tracker.log_metrics(progress.last_train, progress.step)
            if w.rank == 0:
                logger.info("step %d/%d %s", progress.step, t.max_steps,
                            " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in progress.last_train.items()))  # fmt: skip
            preempted = _preemption_notice(progress)
        if bool(flags[3]):
            finish_pending_eval(w, progress)
        if (bool(flags[2]) or preempted) and progress.step < t.max_steps:  # the last step is evaluated anyway
            # a just-in-time checkpoint is uploaded before training goes on: the node may be gone any second
            checkpoint_and_report(parts, w, progress, async_upload=w.cfg.run.async_upload and not preempted)
        if progress.step >= t.max_steps or bool(flags[1]) or taken == w.epoch_steps:
            return None, bool(flags[1])
    return None, True


def _log_first_step(w: Worker, result: StepResult, progress: Progress) -> None:
    """At every (re)start, the group it trains with (a run's history shows each resize); on a fresh run also the
    time to its first step and train/initial_loss: the first batch's loss before any update, averaged over the
    ranks (one extra collective, once per run; a non-finite one is not logged, and the run stops as diverged)."""
    progress.stepped = True
    if progress.step == 0:  # a fresh run (a resumed one starts past step 0): what π starts from
        loss = all_reduce(result.loss.detach().float().reshape(1), dist.ReduceOp.SUM) / w.world
        w.tracker.log_metrics({names.STARTUP_FIRST_STEP_S: time.time() - w.run_started_at,
                               names.TRAIN_INITIAL_LOSS: float(loss)}, 0)  # fmt: skip
    w.tracker.log_events({names.TRAIN_WORLD_SIZE: w.world, names.TRAIN_GLOBAL_BATCH: w.global_batch}, progress.step)


def _eval_scored(w: Worker, progress: Progress) -> bool:
    """Rank 0: whether the background evaluation's score has arrived (never blocks)."""
    return w.rank == 0 and progress.pending_eval is not None and w.evaluator.ready()


def _checkpoint_due(w: Worker, progress: Progress) -> bool:
    """Whether the step about to be taken completes a checkpoint interval (steps, or minutes on rank 0's clock)."""
    r = w.cfg.run
    by_steps = r.checkpoint_every_steps > 0 and (progress.step + 1) % r.checkpoint_every_steps == 0
    by_time = (
        w.rank == 0
        and r.checkpoint_every_minutes > 0
        and (time.monotonic() - progress.last_checkpoint_time >= 60 * r.checkpoint_every_minutes)
    )
    return by_steps or by_time


def _preemption_notice(progress: Progress) -> bool:
    """True once per preemption: Ray reports a node of this group draining for preemption (a barrier: every rank
    asks at the same step). The just-in-time checkpoint then saves the work up to here before the node goes."""
    info = ray.train.get_preemption_info()
    if info is None:
        progress.preemption_saved = False
        return False
    if progress.preemption_saved:
        return False
    logger.warning("preemption notice: %s; checkpointing at step %d", info, progress.step)
    progress.preemption_saved = True
    return True


def checkpoint_and_report(parts: TrainingParts, w: Worker, progress: Progress, *, async_upload: bool) -> None:
    """A step checkpoint between evaluations: the training metrics, no val/AP (scored below every evaluated one).
    A background evaluation still being scored is reported first: checkpoints reach Ray in step order."""
    finish_pending_eval(w, progress)
    metrics = {**progress.last_train, names.STEP: progress.step, names.EPOCH: progress.epoch,
               names.CHECKPOINT_SCORE: names.STEP_CHECKPOINT_SCORE}  # fmt: skip
    state = parts.state(progress.step, progress.epoch, to_dict(w.cfg), w.label_map, {}) if w.rank == 0 else None
    seconds = report(metrics, state, async_upload=async_upload)
    progress.last_checkpoint_time = time.monotonic()
    w.tracker.log_metrics({names.CHECKPOINT_SECONDS: seconds}, progress.step)


def _look_ahead(batches: Any, device: torch.device, w: Worker) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """(batch on the device, whether it is this rank's last of the execution): the next batch is fetched before the
    current one is yielded, so the "out of data" flag can ride on the step's collective."""
    it = iter(batches)
    batch = next(it, None)
    # every rank needs a batch before the first DDP step, or none of them steps
    empty = all_reduce(torch.tensor([float(batch is None)], device=device))
    if bool(empty[0]):
        raise RuntimeError(f"rank {w.rank}: no training batch (train split smaller than {w.global_batch} "
                           "images?)")  # fmt: skip
    while batch is not None:
        nxt = next(it, None)
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}, nxt is None
        batch = nxt


def _nonfinite_message(step: int, result: StepResult) -> str:
    """Every rank's loss terms (gathered) in one line, e.g. 'rank 0: loss_cls=nan loss_box=0.51'."""
    terms = {k: float(v.detach()) for k, v in result.losses.items()}
    terms = {"loss": sum(terms.values()), **terms}
    if result.grad_norm is not None:
        terms["grad_norm"] = float(result.grad_norm)
    per_rank = "; ".join(
        f"rank {r}: " + " ".join(f"{k}={v:.4g}" for k, v in t.items()) for r, t in enumerate(all_gather_objects(terms))
    )
    return f"non-finite loss at step {step}: {per_rank}"


def evaluate_and_report(
    parts: TrainingParts, val_batches: Any, w: Worker, progress: Progress, epoch_images_per_s: float
) -> None:
    """Evaluate on the val split: every rank predicts its part, rank 0 gathers. The last evaluation (or every one,
    with train.background_eval off) is scored here and reported at once; the others are scored in a background
    Ray task while training goes on, and `finish_pending_eval` reports them (metrics + the checkpoint written
    now, at the evaluated step)."""
    finish_pending_eval(w, progress)  # one evaluation at a time, reported in order
    eval_start = time.perf_counter()
    final = progress.step >= w.cfg.train.max_steps
    broadcast_buffers(parts.model)  # every rank evaluates the model the checkpoint holds
    predictions = predict_split(parts.model, val_batches, device=parts.device,
                                autocast=autocast(w.cfg.train.amp, parts.device),
                                num_samples=w.cfg.train.num_logged_images if final else 0)  # fmt: skip
    metrics = {**progress.last_train, names.STEP: progress.step, names.EPOCH: progress.epoch,
               names.TRAIN_EPOCH_IMAGES_PER_S: epoch_images_per_s}  # fmt: skip
    state = parts.state(progress.step, progress.epoch, to_dict(w.cfg), w.label_map, {}) if w.rank == 0 else None
    if w.cfg.train.background_eval and not final:
        if predictions is not None:  # rank 0: the checkpoint of the evaluated weights, written before they change
            directory = write_checkpoint(state)
            w.evaluator.submit(progress.step, predictions, (metrics, directory))
        progress.pending_eval = (progress.step, progress.epoch)
        w.tracker.log_metrics({names.VAL_SECONDS: time.perf_counter() - eval_start}, progress.step)
        return
    result = EvalResult(coco=None, num_images=0, num_detections=0)
    if predictions is not None:
        score_start = time.perf_counter()
        result = score(w.ground_truth(), predictions, list(w.labels.coco_ids), DEFAULT_BACKEND)
        metrics[names.VAL_SCORE_SECONDS] = time.perf_counter() - score_start
        state.metrics = result.metrics()
    metrics[names.VAL_SECONDS] = time.perf_counter() - eval_start
    _report_evaluation(w, progress, result, metrics, state)


def finish_pending_eval(w: Worker, progress: Progress) -> None:
    """Report the background evaluation, if one is pending (every rank calls it at the same step; rank 0 waits
    for the score if it has not arrived)."""
    if progress.pending_eval is None:
        return
    step, epoch = progress.pending_eval
    progress.pending_eval = None
    if w.rank != 0:
        _report_evaluation(w, progress, EvalResult(None, 0, 0), {names.STEP: step, names.EPOCH: epoch}, None)
        return
    finished = w.evaluator.wait()
    metrics, directory = finished.extra
    metrics[names.VAL_SCORE_SECONDS] = finished.seconds
    write_metrics(directory, finished.result.metrics())  # what the checkpoint records as its evaluation
    _report_evaluation(w, progress, finished.result, metrics, directory)


def _report_evaluation(
    w: Worker, progress: Progress, result: EvalResult, metrics: dict[str, Any], checkpoint: Any
) -> None:
    """Every rank reports an evaluation; rank 0 logs it (at its step) and attaches its checkpoint."""
    metrics = {**metrics, **result.metrics(),
               names.CHECKPOINT_SCORE: result.metrics().get(names.VAL_AP, names.STEP_CHECKPOINT_SCORE)}  # fmt: skip
    step, epoch = int(metrics[names.STEP]), int(metrics[names.EPOCH])
    if w.rank == 0:
        log_evaluation(w.tracker, result, metrics, step, epoch, w.labels)
    seconds = report(metrics, checkpoint, async_upload=w.cfg.run.async_upload)
    progress.last_checkpoint_time = time.monotonic()
    w.tracker.log_metrics({names.CHECKPOINT_SECONDS: seconds}, step)
    if w.rank == 0:
        logger.info("epoch %d step %d: %s", epoch, step, {k: round(v, 4) for k, v in result.metrics().items()})
