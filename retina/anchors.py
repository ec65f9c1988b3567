"""Anchor boxes for the P3–P7 feature maps: per location, aspect ratios × scales (A = 9 by default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Anchors centred on the origin for one level: (R * S, 4) xyxy, ratio-major then size.

    The order (ratio-major) and the rounding to whole pixels are torchvision's, so a head trained there
    predicts for the same anchor at the same output channel here.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)  # height / width
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Tiles each level's cell anchors over its feature grid; anchors are shared by every image of a batch."""

    def __init__(
        self,
        base_sizes: Sequence[float],
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        integer_sizes: bool = False,
    ):
        super().__init__()
        level_sizes = [[b * s for s in scales] for b in base_sizes]
        if integer_sizes:  # torchvision truncates: int(32 * 2 ** (1 / 3)) == 40
            level_sizes = [[float(int(v)) for v in sizes] for sizes in level_sizes]
        self.level_sizes = level_sizes
        self.num_anchors = len(scales) * len(aspect_ratios)
        self.cells = [cell_anchors(sizes, aspect_ratios) for sizes in level_sizes]
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(
        self, image_hw: tuple[int, int], grid_sizes: Sequence[tuple[int, int]], device: torch.device
    ) -> torch.Tensor:
        """image_hw: padded batch size; grid_sizes: (h, w) per level → anchors (A_total, 4) xyxy.

        Ordering is level, then row, then column, then cell anchor: the order the head flattens its outputs.
        """
        key = (tuple(image_hw), tuple(tuple(g) for g in grid_sizes), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        levels = []
        for (gh, gw), cell in zip(grid_sizes, self.cells, strict=True):
            # integer division like torchvision: with the default padding to 128 the strides are exact
            stride_h, stride_w = image_hw[0] // gh, image_hw[1] // gw
            shift_x = torch.arange(gw, dtype=torch.float32) * stride_w
            shift_y = torch.arange(gh, dtype=torch.float32) * stride_h
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)  # (gh * gw, 1, 4)
            levels.append((shifts + cell.view(1, -1, 4)).reshape(-1, 4))  # (gh * gw * A, 4)
        anchors = torch.cat(levels).to(device)
        if len(self._cache) > 32:  # multi-scale training sees a handful of sizes; bound the cache anyway
            self._cache.clear()
        self._cache[key] = anchors
        return anchors
