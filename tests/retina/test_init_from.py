"""`retina.init_from`: a model started from another model's weights, its class output chosen by class name, and the
error when the two architectures differ. Fast: tiny models on CPU, no Ray, no MLflow."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn

from retina import from_torchvision
from retina.config import ConfigError, ModelConfig
from retina.head import prior_bias
from retina.init_from import ARCHITECTURE, InitSource, initialise, torchvision_config, torchvision_source
from retina.model import build_retinanet


def _config(num_classes: int, **backbone) -> ModelConfig:
    cfg = ModelConfig(num_classes=num_classes)
    settings = {"name": "resnet10", "width": 8, "norm": "bn", "trainable_layers": 5, "fpn_channels": 16, **backbone}
    cfg.backbone = dataclasses.replace(cfg.backbone, **settings)
    cfg.head.num_convs, cfg.head.prior = 1, 0.02
    return cfg


def _source(names: tuple[str, ...], cfg: ModelConfig | None = None, seed: int = 0) -> InitSource:
    torch.manual_seed(seed)
    model = build_retinanet(cfg or _config(len(names)))
    with torch.no_grad():  # spread every class's output, so that a row taken from the wrong class would show
        model.head.cls_score.weight.normal_(std=0.05)
        model.head.cls_score.bias.uniform_(-3.0, 1.0)
    return InitSource("test source", model.state_dict(), names, model.cfg)


def test_kept_classes_score_as_in_the_source_and_new_ones_start_at_the_prior():
    source = _source(("circle", "square", "triangle", "cross"))
    torch.manual_seed(1)
    model = build_retinanet(_config(3))
    report = initialise(model, source, ["triangle", "hexagon", "circle"])
    assert report.kept == ("triangle", "circle") and report.reinitialised == ("hexagon",)
    assert "2 classes kept (triangle, circle), 1 re-initialised with the prior (hexagon)" in report.summary()

    ours = model.state_dict()
    for key, value in source.state_dict.items():  # everything but the class output is the source's
        if not key.startswith("head.cls_score."):
            assert torch.equal(ours[key], value), key
    # channel a*K + k is class k at anchor shape a: per anchor, the kept classes' rows are the source's rows
    anchors = model.head.num_anchors
    w_src = source.state_dict["head.cls_score.weight"].view(anchors, 4, 16, 3, 3)
    b_src = source.state_dict["head.cls_score.bias"].view(anchors, 4)
    w = ours["head.cls_score.weight"].view(anchors, 3, 16, 3, 3)
    b = ours["head.cls_score.bias"].view(anchors, 3)
    for k, j in ((0, 2), (2, 0)):
        assert torch.equal(w[:, k], w_src[:, j]) and torch.equal(b[:, k], b_src[:, j])
    assert torch.allclose(b[:, 1], torch.full((anchors,), prior_bias(0.02)))
    assert 0.005 < float(w[:, 1].std()) < 0.02  # N(0, 0.01), not a source row (those have std 0.05)

    # the same logits end to end: the model's "circle" column is the source's "circle" column at every anchor
    reference = build_retinanet(source.config).eval()
    reference.load_state_dict(source.state_dict)
    images = torch.randn(1, 3, 128, 128)
    theirs, _, _, _ = reference._head_outputs(images)  # (1, A_total, 4)
    mine, _, _, _ = model.eval()._head_outputs(images)  # (1, A_total, 3)
    assert torch.allclose(mine[..., 2], theirs[..., 0], atol=1e-5)
    assert torch.allclose(mine[..., 0], theirs[..., 2], atol=1e-5)


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ({"backbone": {"width": 16}}, "model.backbone.width is 8 there, 16 here"),
        ({"backbone": {"name": "resnet18"}}, "model.backbone.name is 'resnet10' there, 'resnet18' here"),
        ({"anchors": {"sizes": [16.0, 32.0, 64.0, 128.0, 256.0]}}, "model.anchors.sizes is [32.0"),
        ({"head": {"num_convs": 2}}, "model.head.num_convs is 1 there, 2 here"),
    ],
)
def test_another_architecture_is_a_config_error_naming_the_key(target, named):
    source = _source(("a", "b"))
    cfg = _config(2)
    for section, values in target.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    with pytest.raises(ConfigError, match=r"^model\.init_from: test source does not fit this model: ") as info:
        initialise(build_retinanet(cfg), source, ["a", "b"])
    assert named in str(info.value)


def test_without_the_source_config_the_first_differing_tensor_is_named():
    source = dataclasses.replace(_source(("a", "b")), config=None)  # a state dict without its config
    with pytest.raises(ConfigError, match=r"model\.init_from: .*backbone\.body\.conv1\.weight is \(8, 3, 7, 7\) "
                                          r"there, \(16, 3, 7, 7\) here"):  # fmt: skip
        initialise(build_retinanet(_config(2, width=16)), source, ["a", "b"])
    gn = _config(2, width=32, norm="gn")
    bn = dataclasses.replace(_source(("a", "b"), _config(2, width=32)), config=None)
    with pytest.raises(ConfigError, match=r"it has backbone\.body\.bn1\.running_mean, which this model lacks"):
        initialise(build_retinanet(gn), bn, ["a", "b"])


def test_frozen_batch_norm_starts_from_trained_batch_norm():
    """Fine-tuning with frozen BN from a model trained with BN is the usual recipe: the same tensors, no counter."""
    source = _source(("a", "b"))
    cfg = _config(2)
    cfg.backbone.norm, cfg.backbone.trainable_layers = "frozen_bn", 3
    model = build_retinanet(cfg)
    initialise(model, source, ["b", "a"])
    assert torch.equal(model.state_dict()["backbone.body.bn1.running_var"],
                       source.state_dict["backbone.body.bn1.running_var"])  # fmt: skip


def test_init_from_forms_are_checked_with_the_config():
    mlflow = ("models:/retinanet-demo@champion", "models:/retinanet-demo/3", "runs:/0a1b/model")
    paths = ("runs/demo/checkpoint_000002", "s3://bucket/runs/demo/checkpoint_000002", "/weights/tv.pth")
    for ok in ("", *mlflow, *paths):
        ModelConfig(init_from=ok).check()
    for bad in ("models:/retinanet-demo", "models:/retinanet-demo/latest", "runs:/0a1b", "https://x/model.pth"):
        with pytest.raises(ConfigError, match=r"^model\.init_from: expected models:/NAME@ALIAS"):
            ModelConfig(init_from=bad).check()


def test_torchvision_state_dict_file_keeps_coco_classes_by_name(tmp_path):
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "retinanet_resnet50_fpn.pth"
    torch.save(tv.state_dict(), path)
    expected = from_torchvision(tv).cfg  # what the torchvision model is in this project's terms
    cfg = torchvision_config(num_classes=3)
    for dotted in ARCHITECTURE:
        section, name = dotted.split(".")
        assert getattr(getattr(cfg, section), name) == getattr(getattr(expected, section), name), dotted

    source = torchvision_source(path)
    assert source.class_names[1] == "person" and source.class_names[18] == "dog"  # label = COCO category id
    model = build_retinanet(cfg)
    report = initialise(model, source, ["dog", "person", "hexagon"])
    assert report.kept == ("dog", "person") and report.reinitialised == ("hexagon",)
    ours, theirs = model.state_dict(), tv.state_dict()
    assert torch.equal(ours["backbone.body.layer4.2.conv3.weight"], theirs["backbone.body.layer4.2.conv3.weight"])
    assert torch.equal(ours["head.bbox_pred.weight"], theirs["head.regression_head.bbox_reg.weight"])
    b = ours["head.cls_score.bias"].view(9, 3)
    b_tv = theirs["head.classification_head.cls_logits.bias"].view(9, 91)
    assert torch.equal(b[:, 0], b_tv[:, 18]) and torch.equal(b[:, 1], b_tv[:, 1])

    with pytest.raises(ConfigError, match=r"model\.backbone\.p6_input is 'p5' there, 'c5' here"):
        initialise(build_retinanet(ModelConfig(num_classes=3)), source, ["dog", "person", "hexagon"])
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"model\.init_from: .*other\.pth is not a torchvision RetinaNet"):
        torchvision_source(tmp_path / "other.pth")
