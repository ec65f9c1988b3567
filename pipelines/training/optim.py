"""The optimizer (SGD with momentum and weight decay, or AdamW), and the warm-up + step-decay learning-rate schedule.

The schedule is a pure function of the iteration (`lr_factor`), so a run restored from a checkpoint at step s
continues with exactly the learning rate an uninterrupted run would use at step s.
"""

from __future__ import annotations

from bisect import bisect_right

import torch
from torch import nn

from pipelines.training.settings import TrainConfig


def scaled_lr(train: TrainConfig, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): lr grows with the global batch relative to `base_batch_size`."""
    return train.base_lr * global_batch / train.base_batch_size


def lr_factor(step: int, train: TrainConfig) -> float:
    """Multiplier of the scaled lr at iteration `step` (0-based): linear warm-up, then ×lr_gamma at each lr step."""
    factor = train.lr_gamma ** bisect_right(train.lr_steps, step)
    if step < train.warmup_iters:
        alpha = step / train.warmup_iters
        factor *= train.warmup_factor * (1 - alpha) + alpha
    return factor


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """`lr_factor` as a torch scheduler; its state is plain numbers, so it loads with weights_only=True."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, last_epoch: int = -1):
        self.train = train
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [base * lr_factor(self.last_epoch, self.train) for base in self.base_lrs]

    def state_dict(self) -> dict:
        # The config is not state: it comes from the run's config on every start.
        return {k: v for k, v in super().state_dict().items() if k != "train"}


def build_optimizer(model: nn.Module, train: TrainConfig, global_batch: int) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW, at the linearly scaled lr; both with the configured weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_lr(train, global_batch)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
