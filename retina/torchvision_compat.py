"""Import a torchvision RetinaNet (v1 layout, e.g. ``retinanet_resnet50_fpn``) with its weights and settings.

This is how users start from torchvision's COCO weights (36.4 AP) or its ImageNet backbones: build the
torchvision model however they like (weights downloaded or loaded from a file), then ``from_torchvision``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from retina.config import (
    AnchorConfig,
    BackboneConfig,
    HeadConfig,
    InputConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    PostprocessConfig,
)
from retina.model import RetinaNet, build_retinanet

# (block type, blocks in layer3, conv2 groups) → our backbone name
_RESNETS = {
    (BasicBlock, 2, 1): "resnet18",
    (BasicBlock, 6, 1): "resnet34",
    (Bottleneck, 6, 1): "resnet50",
    (Bottleneck, 23, 1): "resnet101",
    (Bottleneck, 23, 32): "resnext101_32x8d",
}


def _backbone_config(tv: TVRetinaNet) -> BackboneConfig:
    body = tv.backbone.body
    block = type(body.layer3[0])
    groups = body.layer3[0].conv2.groups
    name = _RESNETS.get((block, len(body.layer3), groups))
    if name is None:
        raise ValueError("from_torchvision: unsupported backbone (expected a ResNet-18/34/50/101 or ResNeXt-101)")
    norms = {type(m) for m in body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d, nn.GroupNorm))}
    norm = {FrozenBatchNorm2d: "frozen_bn", nn.BatchNorm2d: "bn", nn.GroupNorm: "gn"}[norms.pop()]
    stages = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    trainable = sum(any(p.requires_grad for p in getattr(body, s).parameters()) for s in stages)
    extra = tv.backbone.fpn.extra_blocks
    return BackboneConfig(
        name=name, norm=norm, trainable_layers=trainable, fpn_channels=tv.backbone.out_channels,
        p6_input="p5" if extra.use_P5 else "c5",
    )  # fmt: skip


def _anchor_config(tv: TVRetinaNet) -> AnchorConfig:
    sizes = tv.anchor_generator.sizes
    ratios = tv.anchor_generator.aspect_ratios
    if len(sizes) != 5 or any(tuple(r) != tuple(ratios[0]) for r in ratios):
        raise ValueError("from_torchvision: expected 5 levels sharing one set of aspect ratios")
    cfg = AnchorConfig(
        sizes=[float(s[0]) for s in sizes], scales=[2 ** (i / len(sizes[0])) for i in range(len(sizes[0]))],
        aspect_ratios=[float(r) for r in ratios[0]], integer_sizes=True,
    )  # fmt: skip
    rebuilt = [[float(int(b * s)) for s in cfg.scales] for b in cfg.sizes]
    if rebuilt != [[float(v) for v in level] for level in sizes]:
        raise ValueError(f"from_torchvision: anchor sizes {sizes} are not base × 2^(i/n) truncated")
    return cfg


_HEAD_KEYS = {
    "head.classification_head.conv.": "head.cls_subnet.",
    "head.classification_head.cls_logits.": "head.cls_score.",
    "head.regression_head.conv.": "head.box_subnet.",
    "head.regression_head.bbox_reg.": "head.bbox_pred.",
}


def torchvision_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision RetinaNet's state dict (v1 layout) in this project's key names: the backbone and FPN keep
    theirs (the same modules), the heads' are renamed. Keys of neither layout pass through unchanged."""
    out = {}
    for key, value in state.items():
        for old, new in _HEAD_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def from_torchvision(tv: TVRetinaNet) -> RetinaNet:
    """Our RetinaNet with the weights and settings of a torchvision RetinaNet (v1 layout)."""
    if not isinstance(tv, TVRetinaNet):
        raise TypeError(f"from_torchvision expects torchvision.models.detection.RetinaNet, got {type(tv)}")
    cls_head, reg_head = tv.head.classification_head, tv.head.regression_head
    head_norms = [m for m in cls_head.conv.modules() if isinstance(m, nn.GroupNorm)]
    loss_type = reg_head._loss_type
    loss = LossConfig(gamma=2.0, alpha=0.25, box_loss=loss_type, smooth_l1_beta=1.0 / 9)  # torchvision's values
    matcher = tv.proposal_matcher
    t = tv.transform
    cfg = ModelConfig(
        num_classes=cls_head.num_classes,
        backbone=_backbone_config(tv),
        anchors=_anchor_config(tv),
        matcher=MatcherConfig(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches),
        head=HeadConfig(num_convs=len(cls_head.conv), prior=0.01, norm="gn" if head_norms else "none"),
        loss=loss,
        postprocess=PostprocessConfig(tv.score_thresh, tv.topk_candidates, tv.nms_thresh, tv.detections_per_img),
        input=InputConfig(
            min_size=int(t.min_size[0]), max_size=int(t.max_size), size_divisible=int(t.size_divisible),
            image_mean=[float(v) for v in t.image_mean], image_std=[float(v) for v in t.image_std],
        ),
    )  # fmt: skip
    if not math.isclose(tv.box_coder.weights[0], 1.0) or len(set(tv.box_coder.weights)) != 1:
        raise ValueError(f"from_torchvision: box coder weights {tv.box_coder.weights} are not (1, 1, 1, 1)")
    model = build_retinanet(cfg)
    model.load_state_dict(torchvision_state_dict(tv.state_dict()), strict=True)
    # keep the frozen/trainable split of the source model
    theirs = dict(tv.backbone.named_parameters())
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(theirs[name].requires_grad)
    model.train(tv.training)
    return model
