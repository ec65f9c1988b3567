"""Box arithmetic: the (dx, dy, dw, dh) coder and pairwise IoU, vectorised over any leading dimensions.

All boxes are xyxy in pixels. The coder uses the width = x2 - x1 convention (no +1) of torchvision and
detectron2, so weights trained there decode identically here.
"""

from __future__ import annotations

import math

import torch

# exp(dw) is clamped so a wild regression output cannot overflow: a box may grow at most 1000/16 times its
# anchor, i.e. from the smallest anchor (16 px at P3's 2:1 ratio) to the size of a 1000-px image.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes ground-truth boxes relative to anchors and decodes predicted deltas back to boxes."""

    def __init__(
        self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), clip: float = BBOX_XFORM_CLIP
    ):
        self.weights = weights
        self.clip = clip

    def encode(self, gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """gt_boxes, anchors: (..., 4) xyxy with broadcastable leading dims → deltas (..., 4)."""
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        gw = gt_boxes[..., 2] - gt_boxes[..., 0]
        gh = gt_boxes[..., 3] - gt_boxes[..., 1]
        gx = gt_boxes[..., 0] + 0.5 * gw
        gy = gt_boxes[..., 1] + 0.5 * gh
        return torch.stack(
            (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)), dim=-1
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """deltas: (..., 4), anchors: (..., 4) broadcastable → boxes (..., 4) xyxy."""
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = torch.clamp(deltas[..., 2] / ww, max=self.clip)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.clip)
        cx = dx * aw + ax
        cy = dy * ah + ay
        half_w = 0.5 * (torch.exp(dw) * aw)
        half_h = 0.5 * (torch.exp(dh) * ah)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) → (...)"""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """boxes1: (..., N, 4), boxes2: (..., M, 4) → IoU (..., N, M). Degenerate unions give 0, not NaN."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def elementwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of matching rows: (..., 4), (..., 4) → (...) in [-1, 1]."""
    x1 = torch.maximum(boxes1[..., 0], boxes2[..., 0])
    y1 = torch.maximum(boxes1[..., 1], boxes2[..., 1])
    x2 = torch.minimum(boxes1[..., 2], boxes2[..., 2])
    y2 = torch.minimum(boxes1[..., 3], boxes2[..., 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / (union + eps)
    cx1 = torch.minimum(boxes1[..., 0], boxes2[..., 0])
    cy1 = torch.minimum(boxes1[..., 1], boxes2[..., 1])
    cx2 = torch.maximum(boxes1[..., 2], boxes2[..., 2])
    cy2 = torch.maximum(boxes1[..., 3], boxes2[..., 3])
    enclosing = (cx2 - cx1) * (cy2 - cy1)
    return iou - (enclosing - union) / (enclosing + eps)


def clip_boxes(boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """boxes: (B, N, 4), image_sizes: (B, 2) as (h, w) → boxes clipped to each image."""
    h = image_sizes[:, 0].to(boxes.dtype)[:, None]
    w = image_sizes[:, 1].to(boxes.dtype)[:, None]
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)
