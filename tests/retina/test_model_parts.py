"""Unit tests with tiny hand-computed tensors: anchors, box coder, matcher, prior init, losses, post-processing."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from retina.anchors import AnchorGenerator, cell_anchors
from retina.boxes import BBOX_XFORM_CLIP, BoxCoder, elementwise_giou, pairwise_iou
from retina.config import HeadConfig, ModelConfig
from retina.head import RetinaNetHead, prior_bias
from retina.losses import assign_targets, detection_losses
from retina.matcher import BACKGROUND, IGNORE, Matcher
from retina.model import build_retinanet
from retina.postprocess import postprocess

# ------------------------------------------------------------------------------------------------ anchors


def test_cell_anchors_by_hand():
    cells = cell_anchors([32.0], [0.5, 1.0, 2.0])
    # ratio = h / w: 0.5 → w = 32·√2 = 45.25, h = 22.63; rounded half-extents (22.6, 11.3) → (23, 11)
    expected = torch.tensor([[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]])
    assert torch.equal(cells, expected)


def test_anchor_count_and_strides_for_128px():
    gen = AnchorGenerator([32, 64, 128, 256, 512], [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0])
    grids = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # P3..P7 of a 128×128 image
    anchors = gen((128, 128), grids, torch.device("cpu"))
    assert anchors.shape == ((256 + 64 + 16 + 4 + 1) * 9, 4)
    # second location of P3 is one stride (8 px) to the right of the first, same cell anchors
    assert torch.equal(anchors[9:18] - anchors[0:9], torch.tensor([[8.0, 0.0, 8.0, 0.0]] * 9))
    # first P4 anchor: stride 16, size 64, ratio 0.5 → centred at 0, half extents (45, 23)
    p4_first = anchors[256 * 9]
    assert torch.equal(p4_first, torch.tensor([-45.0, -23.0, 45.0, 23.0]))


def test_anchors_match_torchvision_with_integer_sizes():
    sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512])
    tv = TVAnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    ours = AnchorGenerator([32, 64, 128, 256, 512], [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0], True)
    grids = [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]  # a 200×300 image padded to 32
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    expected = tv(ImageList(torch.zeros(1, 3, 224, 320), [(200, 300)]), feats)[0]
    assert torch.equal(ours((224, 320), grids, torch.device("cpu")), expected)


# ------------------------------------------------------------------------------------------------ boxes


def test_coder_round_trip_and_zero_for_identity():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 45.0, 25.0]])
    gt = torch.tensor([[1.0, 2.0, 13.0, 18.0], [0.0, 10.0, 60.0, 30.0]])
    deltas = coder.encode(gt, anchors)
    assert torch.allclose(coder.decode(deltas, anchors), gt, atol=1e-5)
    assert torch.equal(coder.encode(anchors, anchors), torch.zeros(2, 4))
    # by hand for the first pair: centres (7, 10) vs (5, 10), sizes (12, 16) vs (10, 20)
    assert torch.allclose(deltas[0], torch.tensor([0.2, 0.0, math.log(1.2), math.log(0.8)]), atol=1e-6)


def test_coder_clamps_huge_scale_deltas():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), anchor)
    assert torch.isfinite(box).all()
    width = box[0, 2] - box[0, 0]
    assert width == pytest.approx(16 * math.exp(BBOX_XFORM_CLIP), rel=1e-5)  # 1000 px


def test_pairwise_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    iou = pairwise_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[50 / 150, 0.0, 1.0]]))
    giou = elementwise_giou(a.expand(3, 4), b)
    # disjoint pair: IoU 0, enclosing 30×30=900, union 200 → -(700/900)
    assert giou[1].item() == pytest.approx(-700 / 900, rel=1e-5)
    assert giou[2].item() == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------ matcher


def test_matcher_three_bands_and_low_quality():
    # 1 image, 2 gts × 5 anchors
    iou = torch.tensor([[[0.70, 0.45, 0.30, 0.10, 0.00], [0.20, 0.46, 0.55, 0.39, 0.00]]])
    valid = torch.tensor([[True, True]])
    strict = Matcher(0.5, 0.4, allow_low_quality=False)(iou, valid)
    assert strict.tolist() == [[0, IGNORE, 1, BACKGROUND, BACKGROUND]]
    # gt 1's best anchor (0.55) is already foreground; add a gt whose best is only 0.35
    iou_lq = torch.cat([iou, torch.tensor([[[0.0, 0.0, 0.0, 0.35, 0.0]]])], dim=1)
    lq = Matcher(0.5, 0.4, allow_low_quality=True)(iou_lq, torch.tensor([[True, True, True]]))
    assert lq.tolist() == [[0, IGNORE, 1, 1, BACKGROUND]]  # anchor 3 keeps its own best gt (1: 0.39 > 0.35)


def test_matcher_ignores_padding_and_handles_empty_images():
    iou = torch.tensor([[[0.9, 0.0]], [[0.9, 0.6]]])  # 2 images × 1 gt slot × 2 anchors
    valid = torch.tensor([[False], [True]])  # image 0 has no boxes: its slot is padding
    m = Matcher()(iou, valid)
    assert m.tolist() == [[BACKGROUND, BACKGROUND], [0, 0]]
    none = Matcher()(torch.zeros(3, 0, 7), torch.zeros(3, 0, dtype=torch.bool))
    assert none.shape == (3, 7) and (none == BACKGROUND).all()


def test_matcher_gt_without_overlap_claims_nothing():
    iou = torch.zeros(1, 1, 4)
    m = Matcher()(iou, torch.tensor([[True]]))
    assert (m == BACKGROUND).all()


# ------------------------------------------------------------------------------------------------ head


@pytest.mark.parametrize("prior", [0.01, 0.1])
def test_prior_init_gives_mean_probability_pi(prior):
    torch.manual_seed(0)
    head = RetinaNetHead(channels=32, num_anchors=9, num_classes=5, prior=prior)
    feats = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2, 1)]
    cls_logits, box_deltas = head(feats)
    assert cls_logits.shape == (2, 341 * 9, 5) and box_deltas.shape == (2, 341 * 9, 4)
    assert torch.sigmoid(cls_logits).mean().item() == pytest.approx(prior, rel=0.05)
    assert prior_bias(prior) == pytest.approx(-math.log((1 - prior) / prior))


# ------------------------------------------------------------------------------------------------ losses


def _anchors_and_logits(num_classes: int = 3):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0]])
    logits = torch.full((2, 3, num_classes), -2.0, requires_grad=True)
    deltas = torch.zeros(2, 3, 4, requires_grad=True)
    return anchors, logits, deltas


def test_assign_targets_batched():
    anchors, _, _ = _anchors_and_logits()
    gt_boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]], [[10.0, 0.0, 21.0, 10.0], [0.0, 10.0, 10.0, 19.0]]]
    )
    gt_labels = torch.tensor([[2, -1], [0, 1]])
    cls_targets, matched = assign_targets(anchors, gt_boxes, gt_labels, Matcher())
    assert cls_targets.tolist() == [[2, BACKGROUND, BACKGROUND], [BACKGROUND, 0, 1]]
    assert torch.equal(matched[0, 0], gt_boxes[0, 0]) and torch.equal(matched[0, 1], anchors[1])


def test_empty_image_box_loss_exactly_zero_and_finite_class_loss():
    anchors, logits, deltas = _anchors_and_logits()
    gt_boxes = torch.zeros(2, 1, 4)
    gt_labels = torch.full((2, 1), -1)
    for kind in ("l1", "smooth_l1", "giou"):
        losses = detection_losses(logits, deltas, anchors, gt_boxes, gt_labels, matcher=Matcher(), coder=BoxCoder(),
                                  box_loss=kind)  # fmt: skip
        assert losses["loss_box"].item() == 0.0
        assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
        (losses["loss_cls"] + losses["loss_box"]).backward()
        assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()
        assert (deltas.grad == 0).all()
        logits.grad = None
        deltas.grad = None


def test_all_ignored_gives_zero_losses():
    anchors, logits, deltas = _anchors_and_logits()
    gt_boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0]], [[0.0, 0.0, 20.0, 20.0]]])  # IoU 0.25 with every anchor
    gt_labels = torch.tensor([[1], [1]])
    matcher = Matcher(fg_iou=0.9, bg_iou=0.1, allow_low_quality=False)  # 0.25 falls in the ignore band
    losses = detection_losses(logits, deltas, anchors, gt_boxes, gt_labels, matcher=matcher, coder=BoxCoder())
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box"].item() == 0.0


def test_class_loss_normalised_by_foreground_count():
    anchors, logits, deltas = _anchors_and_logits(num_classes=1)
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 10.0, 10.0]]])
    gt_labels = torch.tensor([[0], [0]])
    losses = detection_losses(logits, deltas, anchors, gt_boxes, gt_labels, matcher=Matcher(), coder=BoxCoder())
    p = torch.sigmoid(torch.tensor(-2.0))
    pos = 0.25 * (1 - p) ** 2 * -torch.log(p)  # 2 positives (anchor 0 of each image)
    neg = 0.75 * p**2 * -torch.log(1 - p)  # 4 negatives
    assert losses["loss_cls"].item() == pytest.approx(((2 * pos + 4 * neg) / 2).item(), rel=1e-6)
    assert losses["loss_box"].item() == 0.0  # deltas 0 and gt == anchor


# ------------------------------------------------------------------------------------------------ postprocess


def test_postprocess_threshold_nms_and_cap():
    coder = BoxCoder()
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]
    )
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0] = 3.0  # kept
    logits[0, 1, 0] = 2.0  # overlaps anchor 0 (IoU 0.82), same class → suppressed
    logits[0, 3, 1] = 1.0  # same box as anchor 0 but another class → kept
    logits[0, 2, 1] = -2.0  # score 0.12 > 0.05 → kept
    deltas = torch.zeros(1, 4, 4)
    sizes = torch.tensor([[100, 100]])
    dets = postprocess(logits, deltas, anchors, [4], sizes, coder, score_thresh=0.05, nms_thresh=0.5)[0]
    assert dets["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(dets["scores"], torch.sigmoid(torch.tensor([3.0, 1.0, -2.0])))
    assert torch.equal(dets["boxes"][2], anchors[2])
    capped = postprocess(logits, deltas, anchors, [4], sizes, coder, detections_per_img=2)[0]
    assert capped["labels"].tolist() == [0, 1]
    topk1 = postprocess(logits, deltas, anchors, [2, 2], sizes, coder, topk_candidates=1)[0]
    assert sorted(topk1["scores"].tolist()) == sorted(torch.sigmoid(torch.tensor([3.0, 1.0])).tolist())


def test_postprocess_clips_and_drops_non_finite():
    coder = BoxCoder()
    anchors = torch.tensor([[90.0, 90.0, 110.0, 110.0], [0.0, 0.0, 10.0, 10.0]])
    logits = torch.tensor([[[4.0], [float("nan")]]])
    deltas = torch.zeros(1, 2, 4)
    dets = postprocess(logits, deltas, anchors, [2], torch.tensor([[100, 100]]), coder)[0]
    assert dets["boxes"].tolist() == [[90.0, 90.0, 100.0, 100.0]]


# ------------------------------------------------------------------------------------------------ model


def _tiny_model(**head):
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.name = "resnet18"
    cfg.backbone.fpn_channels = 32
    cfg.backbone.norm = "bn"
    cfg.backbone.trainable_layers = 5
    cfg.head = HeadConfig(**head) if head else HeadConfig()
    cfg.input.min_size, cfg.input.max_size = 128, 160
    return build_retinanet(cfg)


def test_model_call_convention():
    torch.manual_seed(0)
    model = _tiny_model()
    images = [torch.rand(3, 100, 140), torch.rand(3, 90, 80)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    model.cfg.postprocess.score_thresh = 0.0
    dets = model(images)
    assert len(dets) == 2
    for det, img in zip(dets, images, strict=True):
        assert det["boxes"].shape[1] == 4 and det["scores"].shape == det["labels"].shape
        # boxes come back in the input image's pixels
        assert det["boxes"][:, 2].max() <= img.shape[2] + 1e-3 and det["boxes"][:, 3].max() <= img.shape[1] + 1e-3


def test_model_rejects_degenerate_boxes():
    model = _tiny_model()
    with pytest.raises(ValueError, match="target 0: box 0"):
        model(
            [torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 10.0, 10.0, 20.0]]), "labels": torch.tensor([0])}]
        )


def test_trainable_layers_freeze_the_stem():
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name = "resnet18"
    cfg.backbone.trainable_layers = 3
    model = build_retinanet(cfg)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_backbone_weights_from_path(tmp_path):
    from torchvision.models import resnet18

    ref = resnet18()
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name = "resnet18"
    cfg.backbone.weights = str(path)
    model = build_retinanet(cfg)
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    cfg.backbone.name = "resnet34"
    with pytest.raises(ValueError, match="do not fit"):
        build_retinanet(cfg)


def test_scaled_resnet_keeps_torchvision_layout_and_scales_the_cost():
    from torchvision.models import resnet18

    from retina.backbone import _STAGES, ScaledResNet

    # at width 64 the rebuilt network is torchvision's ResNet-18 key for key and shape for shape (minus fc)
    ours = ScaledResNet(*_STAGES["resnet18"], width=64).state_dict()
    ref = {k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}

    def body_params(name: str, width: int) -> int:
        cfg = ModelConfig(num_classes=3)
        cfg.backbone.name, cfg.backbone.width, cfg.backbone.fpn_channels = name, width, 64
        model = build_retinanet(cfg)
        feats = model.backbone(torch.rand(1, 3, 128, 192))
        # P3..P7 at strides 8..128, fpn_channels wide, whatever the trunk's width
        assert [tuple(f.shape) for f in feats.values()] == [(1, 64, 128 // s, 192 // s) for s in (8, 16, 32, 64)] + [
            (1, 64, 1, 2)
        ]
        assert model.backbone.body.layer4[0].conv1.out_channels == 8 * width
        return sum(p.numel() for p in model.backbone.body.parameters())

    r18, r10, r10_half = body_params("resnet18", 64), body_params("resnet10", 64), body_params("resnet10", 32)
    assert r10 < 0.5 * r18 and 0.2 * r10 < r10_half < 0.3 * r10  # one block per stage; half width → ~1/4


def test_backbone_width_checks():
    from retina.typed_config import ConfigError

    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name, cfg.backbone.width = "resnext101_32x8d", 32
    with pytest.raises(ConfigError, match="model.backbone.width"):
        cfg.check()
    cfg.backbone.name, cfg.backbone.norm, cfg.backbone.width = "resnet18", "gn", 48
    with pytest.raises(ConfigError, match="multiple of 32"):
        cfg.check()
    cfg.backbone.norm, cfg.backbone.width, cfg.backbone.fpn_channels = "bn", 32, 256  # C5 = 256 = FPN width
    with pytest.raises(ValueError, match="p6_input"):
        build_retinanet(cfg)
