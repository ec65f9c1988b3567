"""The per-worker training loop that Ray Train runs on every DDP worker (`train_func`), and its step (`Loop.run`).

`train_func` sets a worker up: seeds and determinism, the model and its optimizer, the latest checkpoint, the
hooks. `Loop.run` takes the steps; everything else (logging, checkpoints, preemption, evaluation, faults, the
stall watchdog) is a hook called around each step in a declared order: see `pipelines.training.protocol` for the
protocol and its invariants, `pipelines.training.hooks` for the parts.

Data: each rank reads its own rows of the run's plan (`pipelines.data.plan`), one Ray Dataset for all its
remaining steps: the same seed gives the same batches, and a restarted group continues the interrupted epoch at the
exact row (the checkpoint holds the position; an elastic restart with another world size continues at the same
share of the epoch).

Batch and lr when the world size changes (elastic runs): every worker keeps the per-worker batch of the full group
(``data.batch_size / scaling.num_workers``), so the global batch is that times the workers present, and the lr
follows it by the linear scaling rule; see docs/cluster.md.

A non-finite loss ends the run without raising: a raise would make Ray Train restart the workers from the last
checkpoint (FailureConfig), which replays the same steps into the same NaN. Instead every rank returns
``{NONFINITE_KEY: message}`` (naming the step and each rank's loss terms); the driver reads rank 0's return value
(``Result.return_value``), raises `NonFiniteLossError` and marks the MLflow run FAILED.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray.train
import torch

from pipelines import names
from pipelines.config import Config
from pipelines.data.datasets import DecodeCpus, DecodeStream, batches, make_collate_fn, train_decode, val_batches
from pipelines.data.plan import Position, ShardIndex, TrainPlan
from pipelines.tracking.logger import RunLogger
from pipelines.training import protocol
from pipelines.training.checkpoint import TrainState
from pipelines.training.distributed import all_gather_objects
from pipelines.training.faults import Faults
from pipelines.training.hooks import default_hooks
from pipelines.training.init_from import INIT_FROM_TAG, start_from
from pipelines.training.reporting import Reporter
from pipelines.training.resume import load_latest
from pipelines.training.step import StepResult, TrainingParts, apply_update, forward_backward
from retina.data.coco import LabelMap
from retina.model import build_retinanet
from retina.typed_config import to_dict

logger = logging.getLogger("retina.train")


@dataclass(frozen=True)
class RunInputs:
    """What the driver hands every worker (`train_func`'s config): pickled once into the object store."""

    config: Config
    tracking_uri: str
    mlflow_run_id: str
    label_map: list[dict[str, Any]]  # [{"id", "name", "label"}]: stored with every checkpoint
    train_index: ShardIndex  # the train shards as the plan sees them
    val_index: ShardIndex
    faults: Faults  # test-only fault injection
    run_started_at: float  # time.time() on the driver when the run started (time to first step)
    data_group: Any  # the placement group of CPUs reserved for decoding (pipelines/training/reservation.py)


class Loop:
    """One worker's run: its place in the group, its training parts, where it is in the data, and its hooks."""

    def __init__(self, inputs: RunInputs, parts: TrainingParts, state: TrainState | None) -> None:
        cfg = self.cfg = inputs.config
        ctx = ray.train.get_context()
        self.inputs, self.parts = inputs, parts
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.tracker = RunLogger(inputs.tracking_uri, inputs.mlflow_run_id, enabled=self.rank == 0)
        self.labels = LabelMap.from_json(inputs.label_map)
        self.plan = TrainPlan.for_run(inputs.train_index, cfg)
        self.steps_per_epoch = self.plan.steps_per_epoch(self.world)
        self.step, self.position = 0, Position()
        if state is not None:  # the checkpoint's place in the data, for this group's epoch length
            old_steps = self.plan.steps_per_epoch(state.world or self.world)
            self.step, self.position = (
                state.step,
                Position(state.epoch, state.epoch_step).rescaled(old_steps, self.steps_per_epoch),
            )
        self.reporter = Reporter(self.rank, self.tracker, self.labels, cfg, cfg.data.val_shards)
        self.last_train: dict[str, float] = {}  # the latest log window's metrics (every report carries them)
        self.hooks = default_hooks(self)
        self.layout = protocol.vote_names(self.hooks)
        self.inject_nan = False  # set by the fault-injection hook for the next step
        self.epoch_ended = False  # the last step completed an epoch

    @property
    def per_worker_batch(self) -> int:
        return self.cfg.per_worker_batch

    @property
    def global_batch(self) -> int:
        return self.per_worker_batch * self.world

    @property
    def epoch(self) -> int:
        """The epoch the last step belongs to (1-based; what reports, Tune and ASHA count in): the epochs completed,
        plus the one under way. The checkpoint keeps the exact `position`."""
        return self.position.epoch + int(self.position.step > 0)

    def run(self) -> dict[str, Any]:
        """Train from `step` to train.max_steps. Returns {"step"} (+ NONFINITE_KEY when the loss diverged)."""
        max_steps = self.cfg.train.max_steps
        for hook in self.hooks:
            hook.before_train(self)
        batches = self._train_batches(max_steps - self.step)
        while self.step < max_steps:
            batch = {k: v.to(self.parts.device, non_blocking=True) for k, v in next(batches).items()}
            for hook in self.hooks:
                hook.before_step(self)
            result = forward_backward(self.parts, batch, inject_nan=self.inject_nan)
            votes = {k: v for hook in self.hooks for k, v in hook.votes(self, result).items()}
            decision = protocol.agree(self.layout, result.bad, votes)  # the step's one collective
            if decision[protocol.NONFINITE]:
                return self._diverged(result)
            apply_update(self.parts)
            self._advance()
            for hook in self.hooks:
                hook.after_step(self, result, decision)
        for hook in self.hooks:
            hook.after_train(self)
        return {names.STEP: self.step}

    def _advance(self) -> None:
        self.step += 1
        self.position = Position(self.position.epoch, self.position.step + 1)
        self.epoch_ended = self.position.step >= self.steps_per_epoch
        if self.epoch_ended:
            self.position = Position(self.position.epoch + 1, 0)

    def state(self, metrics: dict[str, float] | None = None) -> TrainState | None:
        """What a checkpoint of this step holds (rank 0; None elsewhere: only rank 0 writes)."""
        if self.rank != 0:
            return None
        return self.parts.state(self.step, self.position, self.world, to_dict(self.cfg), self.inputs.label_map,
                                metrics or {})  # fmt: skip

    # ------------------------------------------------------------------------------------------------ data

    def _train_batches(self, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches for `steps` steps from where the run is (the plan's chunks, decoded in order)."""
        chunks = list(self.plan.chunks(self.rank, self.world, self.position, steps))
        blocks = DecodeStream(chunks, train_decode(self.cfg, _s3_settings(self.cfg.data.train_shards)),
                              self.decode_cpus, ordered=self.cfg.train.deterministic)  # fmt: skip
        return self._watched("train", batches(blocks, self.per_worker_batch, make_collate_fn(self.cfg.model.input)))

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's part of the val split, in the same batches at every evaluation."""
        stream = val_batches(self.inputs.val_index, self.cfg.model.input, self.cfg.data.val_batch_size,
                             self.decode_cpus, rank=self.rank, world=self.world,
                             s3_settings=_s3_settings(self.cfg.data.val_shards))  # fmt: skip
        return self._watched("val", stream)

    def _watched(self, split: str, stream: Iterator[Any]) -> Iterator[dict[str, torch.Tensor]]:
        for hook in self.hooks:
            stream = hook.wrap_batches(stream, split)
        return stream

    @property
    def decode_cpus(self) -> DecodeCpus:
        """This rank's share of the CPUs reserved for decoding."""
        return DecodeCpus(self.cfg.scaling.data_cpus / self.world, self.inputs.data_group)

    # ------------------------------------------------------------------------------------------------ divergence

    def _diverged(self, result: StepResult) -> dict[str, Any]:
        message = _nonfinite_message(self.step, result)
        logger.error("rank %d: %s", self.rank, message)
        self.reporter.flush()  # the last good evaluation and its checkpoint still count
        self.tracker.set_tag(names.ERROR_TAG, message[:5000])
        return {names.NONFINITE_KEY: message, names.STEP: self.step}


def _s3_settings(location: str) -> Any:
    from pipelines.data.shards import settings_for

    return settings_for(location)


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


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """The same initial weights on every rank and in every run of the seed (DDP also broadcasts rank 0's), and with
    `deterministic` PyTorch's deterministic kernels (on CUDA also cuDNN without autotuning and cuBLAS's fixed
    workspace, which must be set before the first cuBLAS call)."""
    torch.manual_seed(seed)
    if not deterministic:
        return
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def train_func(config: dict[str, RunInputs]) -> dict[str, Any]:
    """Ray Train entry point (`config`: {"inputs": RunInputs}): set the worker up, restore the latest checkpoint,
    run the loop. Returns {"step": last step} (+ NONFINITE_KEY when it diverged)."""
    inputs = config["inputs"]
    cfg = inputs.config
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    seed_everything(cfg.train.seed, cfg.train.deterministic, device)
    model = build_retinanet(cfg.model)
    checkpoint, state = ray.train.get_checkpoint(), None
    if checkpoint is not None:
        state, checkpoint = load_latest(checkpoint)  # an older complete one where the latest is damaged
        model.load_state_dict(state.model)
        if state.step >= cfg.train.max_steps:
            logger.info("the run already finished (step %d of %d)", state.step, cfg.train.max_steps)
            return {names.STEP: state.step}
    ctx = ray.train.get_context()
    started_from = start_from(model, inputs, ctx.get_world_rank()) if state is None else None  # a fresh start only
    world = ctx.get_world_size()
    parts = TrainingParts.build(model, cfg.train, cfg.per_worker_batch * world)
    if state is not None:
        parts.restore(state)
        # one line per restart (rank 0's): every rank loads the same checkpoint
        logger.log(logging.INFO if ctx.get_world_rank() == 0 else logging.DEBUG,
                   "resumed from %s at step %d (epoch %d, step %d of it)", checkpoint.path, state.step, state.epoch,
                   state.epoch_step)  # fmt: skip
    loop = Loop(inputs, parts, state)
    if state is not None:
        loop.tracker.set_tag(names.RESUMED_FROM_TAG, str(state.step))
    elif started_from is not None:
        loop.tracker.set_tag(INIT_FROM_TAG, started_from.summary())
    return loop.run()
