"""The class and box subnets: 4 × (3×3 conv + ReLU) each, shared across levels, not shared with each other."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def prior_bias(prior: float) -> float:
    """Class-output bias b with sigmoid(b) = π: every anchor starts out predicting 'object' with probability π,
    so the ~100k easy negatives do not swamp the loss at the first iterations (paper §4.1)."""
    return -math.log((1 - prior) / prior)


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    # Each block is Sequential(conv, [norm], relu): the key layout of torchvision's Conv2dNormActivation,
    # which keeps from_torchvision a plain key rename.
    blocks = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")
        layers: list[nn.Module] = [conv]
        if norm == "gn":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


class RetinaNetHead(nn.Module):
    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        prior: float = 0.01,
        norm: str = "none",
    ):
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.cls_subnet = _subnet(channels, num_convs, norm)
        self.box_subnet = _subnet(channels, num_convs, norm)
        self.cls_score = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, prior_bias(prior))

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: per level (B, C, H_l, W_l) → cls_logits (B, A_total, K), box_deltas (B, A_total, 4),
        anchors flattened level, row, column, cell anchor (the AnchorGenerator's order)."""
        cls_out, box_out = [], []
        for x in features:
            b, _, h, w = x.shape
            logits = self.cls_score(self.cls_subnet(x))  # (B, A*K, H, W)
            deltas = self.bbox_pred(self.box_subnet(x))  # (B, A*4, H, W)
            cls_out.append(
                logits.view(b, self.num_anchors, self.num_classes, h, w)
                .permute(0, 3, 4, 1, 2)
                .reshape(b, -1, self.num_classes)
            )
            box_out.append(deltas.view(b, self.num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)
