"""The training metrics of a log window: running sums on the device, averaged over steps and ranks when logged."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pipelines import names
from pipelines.training.distributed import all_reduce
from pipelines.training.step import StepResult


class MetricWindow:
    """Sums loss, loss_cls, loss_box and grad_norm over the steps since the last log line.

    The sums stay on the device (no host sync per step); `flush` all-reduces them once per log interval, so the
    logged loss is the mean over every step and every rank of the window.
    """

    def __init__(self, device: torch.device, world: int, global_batch: int):
        self.world, self.global_batch, self.device = world, global_batch, device
        self.sums = torch.zeros(4, device=device)  # loss, loss_cls, loss_box, grad_norm
        self.steps, self.start = 0, time.perf_counter()

    def add(self, r: StepResult) -> None:
        grad_norm = r.grad_norm.detach() if r.grad_norm is not None else torch.zeros((), device=self.device)
        terms = [r.loss.detach(), r.losses["loss_cls"].detach(), r.losses["loss_box"].detach(), grad_norm]
        self.sums += torch.stack(terms).float()
        self.steps += 1

    def flush(self, lr: float, epoch: int, with_grad_norm: bool) -> dict[str, float]:
        """The window's metrics (a collective: every rank calls it at the same step); then start a new window."""
        means = all_reduce(self.sums.clone(), dist.ReduceOp.SUM) / (max(self.steps, 1) * self.world)
        elapsed = time.perf_counter() - self.start
        metrics = {
            names.TRAIN_LOSS: float(means[0]),
            names.TRAIN_LOSS_CLS: float(means[1]),
            names.TRAIN_LOSS_BOX: float(means[2]),
            names.TRAIN_LR: lr,
            names.TRAIN_IMAGES_PER_S: self.steps * self.global_batch / max(elapsed, 1e-9),
            names.TRAIN_EPOCH: epoch,
            names.TRAIN_WORLD_SIZE: self.world,
            names.TRAIN_GLOBAL_BATCH: self.global_batch,
        }
        if with_grad_norm:
            metrics[names.TRAIN_GRAD_NORM] = float(means[3])
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return metrics
