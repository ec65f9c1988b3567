"""Sigmoid focal loss with class-index labels (reference implementation).

Contract (design.md): ``sigmoid_focal_loss(logits, labels, *, alpha=0.25, gamma=2.0, reduction="sum")``
with ``logits`` float ``[..., K]`` and ``labels`` integer ``[...]``: a class index in ``0..K-1`` for
foreground, ``-1`` for background, ``-2`` for ignored. ``alpha < 0`` disables α-weighting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKGROUND = -1
IGNORE = -2


def sigmoid_focal_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    num_classes = logits.shape[-1]
    x = logits.float()
    # targets: [..., K] in {0, 1}; a comparison against arange avoids an explicit one-hot scatter
    classes = torch.arange(num_classes, device=logits.device)
    targets = (labels.unsqueeze(-1) == classes).to(x.dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    loss = torch.where((labels != IGNORE).unsqueeze(-1), loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(logits.dtype)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be none, mean or sum, got {reduction!r}")


sigmoid_focal_loss = sigmoid_focal_loss_reference
