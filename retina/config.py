"""The model library's configuration: `ModelConfig` and its sections with the paper's defaults, and their range
rules. Loading (YAML, ``--set`` overrides, types) is `retina.typed_config`'s; the other layers declare their own
sections beside the code that reads them (see `pipelines.config.Config`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ConfigError: what ModelConfig.check raises, importable beside the config it checks
from retina.typed_config import ConfigError, load_section, require

__all__ = ["ConfigError", "ModelConfig", "load_model_config", "check_alpha", "check_gamma", "check_prior"]


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet10 | resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d
    # Planes of the stem and first stage; later stages double them. 64 = the standard ResNet (ImageNet weights
    # need it); 32 quarters the compute and the parameters, for small models trained from scratch.
    width: int = 64
    weights: str | None = None  # path to an ImageNet state dict (torchvision layout); None = random init
    norm: str = "frozen_bn"  # frozen_bn (fine-tuning from ImageNet) | bn (from scratch) | gn
    trainable_layers: int = 3  # how many of (conv1, layer1..layer4) train, counted from the top, 0..5
    fpn_channels: int = 256
    # The paper builds P6 from C5; torchvision's v1 RetinaNet builds it from P5 (from_torchvision sets "p5").
    p6_input: str = "c5"  # c5 | p5


@dataclass
class AnchorConfig:
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # base size P3..P7
    scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    # torchvision truncates the scaled sizes to integers (int(32 * 2**(1/3)) = 40); from_torchvision sets this.
    integer_sizes: bool = False


@dataclass
class MatcherConfig:
    fg_iou: float = 0.5  # IoU >= fg_iou: foreground
    bg_iou: float = 0.4  # IoU < bg_iou: background; between the two: ignored
    allow_low_quality: bool = True  # each ground truth keeps its best anchor(s) even below fg_iou


@dataclass
class HeadConfig:
    num_convs: int = 4
    prior: float = 0.01  # π: the class-output bias starts at -log((1 - π) / π)
    norm: str = "none"  # none (paper) | gn (GroupNorm(32), helps training from scratch)


@dataclass
class LossConfig:
    gamma: float = 2.0
    alpha: float = 0.25  # < 0 disables α-weighting
    box_loss: str = "smooth_l1"  # l1 | smooth_l1 | giou
    smooth_l1_beta: float = 0.11  # Detectron's RetinaNet value
    box_weight: float = 1.0


@dataclass
class PostprocessConfig:
    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per level, before NMS
    nms_thresh: float = 0.5  # class-wise
    detections_per_img: int = 100


@dataclass
class InputConfig:
    min_size: int = 800  # shorter side after resizing
    max_size: int = 1333  # longer side limit
    # Stride of P7 is 128: padding to it gives every level an integer grid and exact anchor strides.
    size_divisible: int = 128
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    num_classes: int = 80
    # Fine-tuning: start a fresh run from these weights (an MLflow model URI, a training checkpoint, a torchvision
    # RetinaNet state-dict file); "" starts from backbone.weights / random init. `retina.init_from` explains it.
    init_from: str = ""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def check(self, prefix: str = "model") -> None:
        """The model's range rules; ConfigError naming ``<prefix>.<key>``."""
        b = self.backbone
        require(self.num_classes >= 1, f"{prefix}.num_classes", "must be >= 1")
        check_init_from(self.init_from, f"{prefix}.init_from")
        require(b.name in _BACKBONES, f"{prefix}.backbone.name", f"must be one of {_BACKBONES}")
        require(b.norm in ("frozen_bn", "bn", "gn"), f"{prefix}.backbone.norm", "must be frozen_bn, bn or gn")
        require(b.width >= 8, f"{prefix}.backbone.width", "must be >= 8")
        require(b.width == 64 or b.name != "resnext101_32x8d", f"{prefix}.backbone.width", "must be 64 for resnext")
        require(b.norm != "gn" or b.width % 32 == 0, f"{prefix}.backbone.width", "must be a multiple of 32 with gn")
        require(0 <= b.trainable_layers <= 5, f"{prefix}.backbone.trainable_layers", "must be in 0..5")
        require(b.fpn_channels >= 1, f"{prefix}.backbone.fpn_channels", "must be >= 1")
        require(b.p6_input in ("c5", "p5"), f"{prefix}.backbone.p6_input", "must be c5 or p5")
        a = self.anchors
        require(len(a.sizes) == 5, f"{prefix}.anchors.sizes", "needs one base size per level P3..P7 (5)")
        require(all(s > 0 for s in a.sizes + a.scales + a.aspect_ratios), f"{prefix}.anchors", "must be > 0")
        mt = self.matcher
        require(0 < mt.bg_iou <= mt.fg_iou <= 1, f"{prefix}.matcher", "needs 0 < bg_iou <= fg_iou <= 1")
        h = self.head
        check_prior(h.prior, f"{prefix}.head.prior")
        require(h.norm in ("none", "gn"), f"{prefix}.head.norm", "must be none or gn")
        require(h.num_convs >= 0, f"{prefix}.head.num_convs", "must be >= 0")
        lo = self.loss
        check_gamma(lo.gamma, f"{prefix}.loss.gamma")
        check_alpha(lo.alpha, f"{prefix}.loss.alpha")
        require(lo.box_loss in ("l1", "smooth_l1", "giou"), f"{prefix}.loss.box_loss", "must be l1, smooth_l1, giou")
        require(lo.smooth_l1_beta >= 0, f"{prefix}.loss.smooth_l1_beta", "must be >= 0")
        p = self.postprocess
        require(0 <= p.score_thresh < 1, f"{prefix}.postprocess.score_thresh", "must be in [0, 1)")
        require(p.topk_candidates >= 1, f"{prefix}.postprocess.topk_candidates", "must be >= 1")
        require(p.detections_per_img >= 1, f"{prefix}.postprocess.detections_per_img", "must be >= 1")
        i = self.input
        require(0 < i.min_size <= i.max_size, f"{prefix}.input", "needs 0 < min_size <= max_size")
        require(i.size_divisible >= 1, f"{prefix}.input.size_divisible", "must be >= 1")
        require(len(i.image_mean) == 3 and len(i.image_std) == 3, f"{prefix}.input", "mean/std need 3 values")
        require(all(s > 0 for s in i.image_std), f"{prefix}.input.image_std", "must be > 0")


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Only the ``model`` section of a run config (for code that builds a model without Ray or MLflow).

    `overrides` are dotted keys inside the model section (``head.prior=0.5``); errors name ``model.<key>``."""
    return load_section(path, "model", overrides, cls=ModelConfig)


# ------------------------------------------------------------------------------------------------ checks

_BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")


# The focal-loss hyperparameters' ranges, shared by the model's checks and the search space's (tuning/space.py).
def check_gamma(value: float, key: str) -> None:
    require(math.isfinite(value) and value >= 0, key, f"γ must be >= 0, got {value}")


def check_alpha(value: float, key: str, *, allow_disabled: bool = True) -> None:
    require(math.isfinite(value), key, f"must be a finite number, got {value!r}")
    if allow_disabled:
        require(value <= 1, key, f"α must be in [0, 1] (or < 0 to disable), got {value}")
    else:
        require(0 <= value <= 1, key, f"α must be in [0, 1] (a choice value < 0 disables α-weighting), got {value}")


def check_prior(value: float, key: str) -> None:
    require(0 < value < 1, key, f"π must be in (0, 1), got {value}")


# The MLflow forms model.init_from takes; everything else without a scheme (or s3://) is a path. Only the form is
# checked here: this config is also rebuilt where the source does not exist (a trained model loaded elsewhere).
_MLFLOW_MODEL = re.compile(r"models:/([^/@\s]+@[A-Za-z0-9_-]+|[^/@\s]+/\d+)|runs:/[^/\s]+/\S+")
INIT_FROM_FORMS = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, a training checkpoint (a folder holding "
    "state.pt, local or s3://) or a torchvision RetinaNet state-dict file"
)


def check_init_from(value: str, key: str) -> None:
    if value.startswith(("models:/", "runs:/")):
        require(bool(_MLFLOW_MODEL.fullmatch(value)), key, f"expected {INIT_FROM_FORMS}, got {value!r}")
    else:
        require("://" not in value or value.startswith("s3://"), key, f"expected {INIT_FROM_FORMS}, got {value!r}")
