"""RetinaNet: backbone + FPN (P3–P7), class and box subnets, anchors, focal-loss training, post-processing.

Two entry points:
- ``model(images, targets=None)``: the torchvision detection convention. ``images`` is a list of float
  (3, H, W) tensors in 0..1; the model resizes, normalises and pads them itself. Train mode returns
  ``{"loss_cls", "loss_box"}``; eval mode returns per image ``{"boxes", "scores", "labels"}`` with boxes in
  the input image's pixels.
- ``model.losses(images, gt_boxes, gt_labels)`` / ``model.predict_batch(batch)``: the training pipeline's path,
  taking the collated batch that the data pipeline prepared on CPU workers (already resized, normalised, padded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from retina import transform as T
from retina.anchors import AnchorGenerator
from retina.backbone import build_backbone
from retina.boxes import BoxCoder
from retina.config import ModelConfig
from retina.head import RetinaNetHead
from retina.losses import assign_targets, detection_losses
from retina.matcher import Matcher
from retina.postprocess import postprocess, rescale_boxes


class RetinaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module, head: RetinaNetHead, anchor_generator: AnchorGenerator):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = Matcher(cfg.matcher.fg_iou, cfg.matcher.bg_iou, cfg.matcher.allow_low_quality)
        self.box_coder = BoxCoder()

    # ------------------------------------------------------------------------------------------ core

    def _head_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """images (B, 3, H, W) normalised and padded → cls_logits (B, A, K), box_deltas (B, A, 4),
        anchors (A, 4), anchors per level."""
        features = list(self.backbone(images).values())  # P3..P7
        cls_logits, box_deltas = self.head(features)
        grids = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(tuple(images.shape[-2:]), grids, images.device)
        level_sizes = [h * w * self.anchor_generator.num_anchors for h, w in grids]
        return cls_logits, box_deltas, anchors, level_sizes

    def losses(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W); gt_boxes (B, M, 4) xyxy in the padded image's pixels; gt_labels (B, M) with -1
        on padding rows → {"loss_cls", "loss_box"} (scalars)."""
        cls_logits, box_deltas, anchors, _ = self._head_outputs(images)
        lc = self.cfg.loss
        return detection_losses(
            cls_logits, box_deltas, anchors, gt_boxes, gt_labels.long(),
            matcher=self.matcher, coder=self.box_coder, gamma=lc.gamma, alpha=lc.alpha, box_loss=lc.box_loss,
            smooth_l1_beta=lc.smooth_l1_beta, box_weight=lc.box_weight,
        )  # fmt: skip

    def classification_targets(
        self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the class loss of `losses` sees: images (B, 3, H, W); gt_boxes (B, M, 4); gt_labels (B, M) with -1
        on padding rows → cls_logits (B, A, K) and cls_targets (B, A) int64 (class index, -1 background, -2
        ignored)."""
        cls_logits, _, anchors, _ = self._head_outputs(images)
        cls_targets, _ = assign_targets(anchors, gt_boxes, gt_labels.long(), self.matcher)
        return cls_logits, cls_targets

    @torch.no_grad()
    def detect(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """images (B, 3, H, W); image_sizes (B, 2) (h, w) before padding → detections in those pixels."""
        cls_logits, box_deltas, anchors, level_sizes = self._head_outputs(images)
        p = self.cfg.postprocess
        return postprocess(
            cls_logits, box_deltas, anchors, level_sizes, image_sizes, self.box_coder,
            score_thresh=p.score_thresh, topk_candidates=p.topk_candidates, nms_thresh=p.nms_thresh,
            detections_per_img=p.detections_per_img,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ batch API

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Collated batch ("images", "image_sizes", "orig_sizes") → detections in original-image pixels."""
        dets = self.detect(batch["images"], batch["image_sizes"])
        for det, resized, orig in zip(dets, batch["image_sizes"].tolist(), batch["orig_sizes"].tolist(), strict=True):
            det["boxes"] = rescale_boxes(det["boxes"], resized, orig)
        return dets

    # ------------------------------------------------------------------------------------------ torchvision API

    def preprocess(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """Normalise, resize and pad like torchvision's GeneralizedRCNNTransform → (B, 3, H, W) images,
        (B, 2) resized sizes, targets with boxes in resized pixels."""
        ic = self.cfg.input
        resized, sizes, out_targets = [], [], [] if targets is not None else None
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(img.shape)}")
            x = T.resize(T.normalize(img, ic.image_mean, ic.image_std), ic.min_size, ic.max_size)
            resized.append(x)
            sizes.append(x.shape[-2:])
            if targets is not None:
                t = dict(targets[i])
                t["boxes"] = T.resize_boxes(t["boxes"], img.shape[-2:], x.shape[-2:])
                out_targets.append(t)
        batch = T.batch_images(resized, ic.size_divisible)
        image_sizes = torch.tensor([list(s) for s in sizes], dtype=torch.int64, device=batch.device)
        return batch, image_sizes, out_targets

    def forward(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            check_targets(targets)
        batch, image_sizes, targets = self.preprocess(images, targets)
        if self.training:
            gt_boxes, gt_labels = pad_targets(targets, batch.device)
            return self.losses(batch, gt_boxes, gt_labels)
        dets = self.detect(batch, image_sizes)
        for det, resized, img in zip(dets, image_sizes.tolist(), images, strict=True):
            det["boxes"] = rescale_boxes(det["boxes"], resized, img.shape[-2:])
        return dets


def check_targets(targets: Sequence[dict[str, torch.Tensor]]) -> None:
    """Targets must be (N, 4) xyxy boxes with positive width and height and (N,) labels."""
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: 'boxes' must be a (N, 4) tensor")
        if not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: 'labels' must be a (N,) tensor matching 'boxes'")
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} has no positive width and height")


def pad_targets(targets: Sequence[dict[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image targets → gt_boxes (B, M, 4) padded with 0 and gt_labels (B, M) padded with -1, M >= 1."""
    m = max([1] + [int(t["boxes"].shape[0]) for t in targets])
    gt_boxes = torch.zeros((len(targets), m, 4), dtype=torch.float32, device=device)
    gt_labels = torch.full((len(targets), m), -1, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        n = t["boxes"].shape[0]
        gt_boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        gt_labels[i, :n] = t["labels"].to(device=device, dtype=torch.int64)
    return gt_boxes, gt_labels


def build_retinanet(cfg: ModelConfig | None = None, backbone_weights: str | dict | None = None) -> RetinaNet:
    """The one place that reads the model config. `backbone_weights` overrides cfg.backbone.weights (a dict
    cannot live in a YAML config)."""
    cfg = dataclasses.replace(cfg) if cfg is not None else ModelConfig()
    cfg.check()
    b, a, h = cfg.backbone, cfg.anchors, cfg.head
    backbone = build_backbone(
        b.name, backbone_weights if backbone_weights is not None else b.weights, b.norm, b.trainable_layers,
        b.fpn_channels, b.p6_input, b.width,
    )  # fmt: skip
    anchor_generator = AnchorGenerator(a.sizes, a.scales, a.aspect_ratios, a.integer_sizes)
    head = RetinaNetHead(b.fpn_channels, anchor_generator.num_anchors, cfg.num_classes, h.num_convs, h.prior, h.norm)
    return RetinaNet(cfg, backbone, head, anchor_generator)
