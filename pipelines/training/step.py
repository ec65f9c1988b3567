"""One optimizer step of the worker loop, and the parts it works on.

A step is split in two around the one collective of the step (see `pipelines.training.protocol`):
`forward_backward` computes the loss and the gradients (and clips them), then every rank agrees on the step's
flags, then `apply_update` steps the optimizer, the loss scaler and the lr schedule, or nobody does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import ray.train.torch
import torch
from torch import nn

from pipelines.data.plan import Position
from pipelines.training.checkpoint import TrainState
from pipelines.training.optim import WarmupMultiStepLR, build_optimizer
from pipelines.training.settings import TrainConfig
from retina.model import RetinaNet

logger = logging.getLogger("retina.train")
# CPU instructions that run bf16 matrix products natively (Linux /proc/cpuinfo names); without them PyTorch
# emulates bf16 and autocast is much slower than fp32 (~15x per demo step on an AVX2-only EPYC, measured).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class LossModule(nn.Module):
    """DDP synchronises gradients through `forward`; the model's batched loss lives in `losses`, so wrap it."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.losses(images, gt_boxes, gt_labels)


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The train.amp setting as a context manager (a fresh one per use)."""
    if amp == "none":
        return contextlib.nullcontext()
    # bf16 needs no loss scaling (fp32's exponent range); fp16 pairs with the GradScaler.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU runs bf16 matrix products natively (None: not Linux, nothing to go by)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp as this worker runs it: ``auto`` becomes bf16 on a GPU with bf16 or a CPU with native bf16, else
    none (fp32). So the same config and seed repeat on the same kind of machine; another kind may differ."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if cpu_has_native_bf16() else "none"


def warn_if_bf16_is_emulated(amp: str, device: torch.device) -> None:
    """bf16 autocast on a CPU without native bf16 runs, but many times slower than fp32: say so once per worker."""
    if amp == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        logger.warning("train.amp=bf16 on a CPU without %s: PyTorch emulates bf16 and a step can take ~15x longer "
                       "than in fp32; set train.amp=auto or none on this machine",
                       " or ".join(NATIVE_BF16_FLAGS))  # fmt: skip


@dataclass
class TrainingParts:
    """What a worker trains: the bare model (evaluation, checkpoints), its DDP wrapper (steps), the optimizer,
    the lr schedule and the fp16 loss scaler."""

    model: RetinaNet
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupMultiStepLR
    scaler: torch.amp.GradScaler
    device: torch.device
    train: TrainConfig
    params: list[nn.Parameter]  # the trainable ones (gradient clipping)

    @classmethod
    def build(cls, model: RetinaNet, train: TrainConfig, global_batch: int) -> TrainingParts:
        """`model` already holds any restored weights: prepare_model moves it and wraps it in DDP (world > 1).
        `global_batch`: the images of one optimizer step in this worker group (the lr scales with it)."""
        device = ray.train.torch.get_device()
        train = dataclasses.replace(train, amp=resolve_amp(train.amp, device))  # parts.train: what this worker runs
        warn_if_bf16_is_emulated(train.amp, device)
        logger.info("precision: %s", {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[train.amp])
        ddp_model = ray.train.torch.prepare_model(LossModule(model))
        optimizer = build_optimizer(model, train, global_batch)
        scheduler = WarmupMultiStepLR(optimizer, train)
        scaler = torch.amp.GradScaler(device.type, enabled=train.amp == "fp16")
        params = [p for p in model.parameters() if p.requires_grad]
        return cls(model, ddp_model, optimizer, scheduler, scaler, device, train, params)

    def restore(self, state: TrainState) -> None:
        """Optimizer, schedule and scaler as the checkpoint left them: the lr continues at its step, scaled for
        this group's global batch (an elastic run may come back with another world size than it saved with)."""
        base_lrs = list(self.scheduler.base_lrs)  # the linear-scaling rule's lr for this group
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.scheduler.base_lrs = base_lrs
        for group, base, lr in zip(self.optimizer.param_groups, base_lrs, self.scheduler.get_lr(), strict=True):
            group["initial_lr"], group["lr"] = base, lr
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state(
        self, step: int, position: Position, world: int, config: dict, label_map: list[dict], metrics: dict
    ) -> TrainState:
        """A checkpoint of these parts at `step`, with its place in the data (`position`, for `world` ranks)."""
        return TrainState(
            step=step, epoch=position.epoch, epoch_step=position.step, world=world, config=config,
            label_map=label_map, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), metrics=metrics,
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )  # fmt: skip

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # loss_cls, loss_box: scalars, this rank's batch
    loss: torch.Tensor  # their sum
    grad_norm: torch.Tensor | None  # total norm before clipping (None: clipping off)
    bad: torch.Tensor  # () bool: the loss (or, unless fp16, the gradient norm) is not finite


def forward_backward(parts: TrainingParts, batch: dict[str, torch.Tensor], *, inject_nan: bool = False) -> StepResult:
    """Loss and gradients of one batch (already on the device); the optimizer is not stepped yet."""
    t = parts.train
    with autocast(t.amp, parts.device):
        losses = parts.ddp_model(batch["images"], batch["gt_boxes"], batch["gt_labels"])
    if inject_nan:  # test hook (pipelines/training/faults.py): a NaN that flows into the gradients
        losses = {**losses, "loss_cls": losses["loss_cls"] * float("nan")}
    loss = losses["loss_cls"] + losses["loss_box"]
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    grad_norm = None
    if t.grad_clip > 0:
        parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(parts.params, t.grad_clip)
    bad = ~torch.isfinite(loss.detach())
    if grad_norm is not None and t.amp != "fp16":  # under fp16 the scaler skips inf-gradient steps itself
        bad = bad | ~torch.isfinite(grad_norm)
    return StepResult(losses, loss, grad_norm, bad)


def apply_update(parts: TrainingParts) -> None:
    """Step the optimizer (through the fp16 scaler), the scaler and the lr schedule."""
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
