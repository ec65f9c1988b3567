"""Anchor ↔ ground-truth assignment for a whole padded batch at once (no loop over images)."""

from __future__ import annotations

import torch

BACKGROUND = -1  # IoU < bg_iou with every ground truth
IGNORE = -2  # bg_iou <= best IoU < fg_iou: neither foreground nor background


class Matcher:
    """IoU ≥ fg_iou → foreground (the gt index), IoU < bg_iou → BACKGROUND, in between → IGNORE.

    With ``allow_low_quality`` every ground truth also keeps the anchor(s) it overlaps most, even below
    fg_iou, so that no object goes without a positive anchor (torchvision and detectron2 do the same). A ground
    truth that overlaps no anchor at all (best IoU 0) claims nothing: otherwise every zero-IoU anchor would tie.
    """

    def __init__(self, fg_iou: float = 0.5, bg_iou: float = 0.4, allow_low_quality: bool = True):
        if not 0 < bg_iou <= fg_iou <= 1:
            raise ValueError(f"matcher thresholds need 0 < bg_iou <= fg_iou <= 1, got {bg_iou}, {fg_iou}")
        self.fg_iou = fg_iou
        self.bg_iou = bg_iou
        self.allow_low_quality = allow_low_quality

    def __call__(self, iou: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
        """iou: (B, M, A) gt × anchor; gt_valid: (B, M) False on padding rows → matches (B, A) int64:
        the matched gt index in 0..M-1, or BACKGROUND / IGNORE."""
        batch, num_gt, num_anchors = iou.shape
        if num_gt == 0:
            return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.int64, device=iou.device)
        iou = torch.where(gt_valid[:, :, None], iou, torch.full_like(iou, -1.0))  # padding never wins
        best_iou, best_gt = iou.max(dim=1)  # (B, A), (B, A)
        matches = torch.where(best_iou >= self.fg_iou, best_gt, torch.full_like(best_gt, IGNORE))
        matches = torch.where(best_iou < self.bg_iou, torch.full_like(best_gt, BACKGROUND), matches)
        if self.allow_low_quality:
            best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, M, 1)
            is_best = (iou == best_per_gt) & (best_per_gt > 0) & gt_valid[:, :, None]  # (B, M, A)
            low_quality = is_best.any(dim=1)  # (B, A)
            # like torchvision: the anchor takes its own best gt, which may differ from the gt it is best for
            matches = torch.where(low_quality, best_gt, matches)
        return matches
