"""The detector's training loss, computed for the whole padded batch at once.

Normaliser (paper §3.3/§4.1): the class loss is summed over every non-ignored anchor of the batch and the box
loss over every foreground anchor, both divided by the batch's number of foreground anchors (at least 1).
For a single image this is exactly torchvision's per-image normalisation. The count stays on the device: no
host synchronisation, no data-dependent shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retina.boxes import BoxCoder, elementwise_giou, pairwise_iou
from retina.matcher import BACKGROUND, Matcher
from retina.ops import sigmoid_focal_loss


def assign_targets(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, matcher: Matcher
) -> tuple[torch.Tensor, torch.Tensor]:
    """anchors: (A, 4); gt_boxes: (B, M, 4); gt_labels: (B, M) with -1 on padding rows →
    cls_targets (B, A) int64 (class index, -1 background, -2 ignored) and matched_boxes (B, A, 4) (the matched gt
    box for foreground anchors, the anchor itself elsewhere so that encoding it is finite)."""
    gt_valid = gt_labels >= 0  # (B, M)
    iou = pairwise_iou(gt_boxes, anchors[None])  # (B, M, A)
    matches = matcher(iou, gt_valid)  # (B, A)
    foreground = matches >= 0
    index = matches.clamp(min=0)  # (B, A) valid gather index everywhere
    matched_labels = torch.gather(gt_labels, 1, index)  # (B, A)
    cls_targets = torch.where(foreground, matched_labels, matches)
    if gt_boxes.shape[1] == 0:
        matched = anchors.expand(gt_boxes.shape[0], -1, -1)
    else:
        matched = torch.gather(gt_boxes, 1, index[..., None].expand(-1, -1, 4))  # (B, A, 4)
    matched_boxes = torch.where(foreground[..., None], matched, anchors.expand_as(matched))
    return cls_targets, matched_boxes


def box_regression_loss(
    kind: str,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    matched_boxes: torch.Tensor,
    foreground: torch.Tensor,
    coder: BoxCoder,
    beta: float = 0.11,
) -> torch.Tensor:
    """Sum over foreground anchors of the per-anchor box loss. box_deltas (B, A, 4), anchors (A, 4),
    matched_boxes (B, A, 4), foreground (B, A) bool → scalar; exactly 0 when there is no foreground anchor."""
    if kind == "giou":
        pred = coder.decode(box_deltas, anchors[None])  # (B, A, 4)
        per_anchor = 1.0 - elementwise_giou(pred, matched_boxes)  # (B, A)
    else:
        target = coder.encode(matched_boxes, anchors[None])  # (B, A, 4), zero off the foreground
        if kind == "l1":
            per_anchor = (box_deltas - target).abs().sum(-1)
        elif kind == "smooth_l1":
            per_anchor = F.smooth_l1_loss(box_deltas, target, reduction="none", beta=beta).sum(-1)
        else:
            raise ValueError(f"loss.box_loss must be l1, smooth_l1 or giou, got {kind!r}")
    return torch.where(foreground, per_anchor, torch.zeros_like(per_anchor)).sum()


def detection_losses(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    *,
    matcher: Matcher,
    coder: BoxCoder,
    gamma: float = 2.0,
    alpha: float = 0.25,
    box_loss: str = "smooth_l1",
    smooth_l1_beta: float = 0.11,
    box_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), gt (B, M, 4)/(B, M) → {loss_cls, loss_box}."""
    cls_targets, matched_boxes = assign_targets(anchors, gt_boxes, gt_labels, matcher)
    foreground = cls_targets >= 0  # (B, A)
    num_foreground = foreground.sum().clamp(min=1).to(torch.float32)  # stays on the device
    loss_cls = sigmoid_focal_loss(cls_logits, cls_targets, alpha=alpha, gamma=gamma, reduction="sum")
    loss_box = box_regression_loss(box_loss, box_deltas, anchors, matched_boxes, foreground, coder, smooth_l1_beta)
    return {"loss_cls": loss_cls / num_foreground, "loss_box": box_weight * loss_box / num_foreground}


__all__ = ["assign_targets", "box_regression_loss", "detection_losses", "BACKGROUND"]
