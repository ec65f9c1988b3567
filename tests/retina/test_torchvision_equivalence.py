"""from_torchvision: same detections and (single-image) losses as torchvision's RetinaNet on the same images."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.resnet import resnet18
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import retina


def _spread_head(tv: TVRetinaNet, seed: int) -> None:
    """Random init puts every score near π (under the 0.05 threshold); spread the class logits so that the test
    compares hundreds of detections over a wide score range instead of none."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = tv.head.classification_head.cls_logits.weight
        w.add_(torch.randn(w.shape, generator=g) * 0.02)
        tv.head.classification_head.cls_logits.bias.fill_(-2.0)


def _sorted(det: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # NMS output order among exactly equal scores is an implementation detail; sort by (score, box) to compare
    key = det["scores"].double() * 1e6 + det["boxes"][:, 0].double() * 1e-3 + det["boxes"][:, 1].double() * 1e-7
    order = torch.argsort(key, descending=True, stable=True)
    return {k: v[order] for k, v in det.items()}


def _compare(tv: TVRetinaNet, images: list[torch.Tensor]) -> int:
    ours = retina.from_torchvision(tv).eval()
    tv.eval()
    with torch.no_grad():
        expected = tv(images)
        got = ours(images)
    total = 0
    for e, g in zip(expected, got, strict=True):
        e, g = _sorted(e), _sorted(g)
        assert e["boxes"].shape == g["boxes"].shape
        assert torch.equal(e["labels"], g["labels"])
        assert (e["scores"] - g["scores"]).abs().max().item() <= 1e-4
        assert (e["boxes"] - g["boxes"]).abs().max().item() <= 1e-3
        total += len(e["boxes"])
    return total


def test_resnet50_fpn_detections_and_losses_match():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=11, min_size=320, max_size=480)
    tv.detections_per_img = 100
    _spread_head(tv, seed=1)
    images = [torch.rand(3, 240, 330), torch.rand(3, 300, 210)]
    assert _compare(tv, images) >= 150  # the comparison covers many detections, not an empty list

    ours = retina.from_torchvision(tv)
    assert ours.cfg.backbone.p6_input == "p5" and ours.cfg.input.size_divisible == 32
    tv.train()
    ours.train()
    target = [
        {
            "boxes": torch.tensor([[20.0, 30.0, 120.0, 200.0], [150.0, 40.0, 300.0, 90.0]]),
            "labels": torch.tensor([3, 7]),
        }
    ]
    expected = tv(images[:1], target)
    got = ours(images[:1], target)
    assert got["loss_cls"].item() == pytest.approx(expected["classification"].item(), rel=1e-5)
    assert got["loss_box"].item() == pytest.approx(expected["bbox_regression"].item(), rel=1e-5)


def test_frozen_bn_resnet18_and_giou_variant_match():
    torch.manual_seed(3)
    trunk = resnet18(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(trunk, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(512, 256))
    tv = TVRetinaNet(backbone, num_classes=4, min_size=256, max_size=320, score_thresh=0.1, detections_per_img=50)
    tv.head.regression_head._loss_type = "giou"
    _spread_head(tv, seed=2)
    images = [torch.rand(3, 200, 256)]
    assert _compare(tv, images) >= 20
    ours = retina.from_torchvision(tv)
    assert ours.cfg.backbone.name == "resnet18" and ours.cfg.backbone.norm == "frozen_bn"
    assert ours.cfg.backbone.p6_input == "c5" and ours.cfg.loss.box_loss == "giou"
    assert not any(p.requires_grad for p in ours.backbone.body.layer1.parameters())
    tv.train()
    ours.train()
    target = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([2])}]
    expected = tv(images, target)
    got = ours(images, target)
    assert got["loss_cls"].item() == pytest.approx(expected["classification"].item(), rel=1e-5)
    assert got["loss_box"].item() == pytest.approx(expected["bbox_regression"].item(), rel=1e-5)


def test_rejects_other_models():
    with pytest.raises(TypeError, match="from_torchvision expects"):
        retina.from_torchvision(torch.nn.Linear(2, 2))
