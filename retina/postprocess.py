"""From head outputs to detections: score threshold, top-k per level, decode, clip, class-wise NMS, cap.

Threshold and top-k run batched on fixed shapes; only NMS, whose output size depends on the data, runs per
image (inference only, so no loss or gradient path loops over images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import batched_nms

from retina.boxes import BoxCoder, clip_boxes


def postprocess(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    level_sizes: Sequence[int],
    image_sizes: torch.Tensor,
    coder: BoxCoder,
    *,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """cls_logits (B, A, K), box_deltas (B, A, 4), anchors (A, 4), level_sizes: anchors per level (sum A),
    image_sizes (B, 2) (h, w) of the resized images → per image {"boxes" (N, 4) xyxy, "scores" (N,),
    "labels" (N,) int64}, boxes in the resized image's pixels, sorted by descending score."""
    batch, _, num_classes = cls_logits.shape
    cand_scores, cand_labels, cand_boxes = [], [], []
    start = 0
    for count in level_sizes:
        logits = cls_logits[:, start : start + count].reshape(batch, -1)  # (B, A_l * K)
        k = min(topk_candidates, logits.shape[1])
        # top-k on logits (sigmoid is monotonic) then threshold: the same set as threshold-then-top-k
        top_logits, flat_idx = logits.topk(k, dim=1)  # (B, k), sorted descending
        anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor") + start
        deltas = torch.gather(box_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
        boxes = coder.decode(deltas, anchors[anchor_idx])  # (B, k, 4)
        cand_boxes.append(clip_boxes(boxes, image_sizes))
        cand_scores.append(torch.sigmoid(top_logits.float()))
        cand_labels.append(flat_idx % num_classes)
        start += count
    scores = torch.cat(cand_scores, dim=1)  # (B, C) C = candidates over all levels
    labels = torch.cat(cand_labels, dim=1)
    boxes = torch.cat(cand_boxes, dim=1).float()
    finite = torch.isfinite(boxes).all(-1) & torch.isfinite(scores)  # inf/NaN features must not crash NMS
    keep_mask = (scores > score_thresh) & finite
    results = []
    for i in range(batch):
        m = keep_mask[i]
        b, s, lab = boxes[i][m], scores[i][m], labels[i][m]
        keep = batched_nms(b, s, lab, nms_thresh)[:detections_per_img]
        results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return results


def rescale_boxes(boxes: torch.Tensor, resized_hw: Sequence[int], original_hw: Sequence[int]) -> torch.Tensor:
    """boxes (N, 4) in the resized image → the original image's pixels (per-axis ratios, as torchvision)."""
    ratio_h = original_hw[0] / resized_hw[0]
    ratio_w = original_hw[1] / resized_hw[1]
    return boxes * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=boxes.dtype, device=boxes.device)
