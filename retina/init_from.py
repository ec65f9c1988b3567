"""Start a model from another model's weights (``model.init_from``): fine-tuning onto your own classes.

Everything but the class output is copied as it is: the backbone, the FPN, the class subnet's convs and the box
subnet. The class output (``head.cls_score``, a 3x3 conv whose A·K output channels are anchor-major: channel
a·K + k scores class k at anchor shape a) is copied channel by channel for every class whose name the source also
has, and re-initialised for the others as the paper initialises it (weights N(0, 0.01), bias -log((1 - π) / π)):
a new class starts where a fresh model's classes start, at the prior, so it does not swamp the loss of the others.

The architecture must be the source's: the keys in `ARCHITECTURE` are compared first (when the source's config is
known), then every tensor's name and shape; the first difference is a ConfigError naming ``model.init_from`` and
that key. Only ``model.num_classes``, the class names and settings that no weight depends on (the loss, matcher,
post-processing, input size, frozen layers, frozen or trained batch norm) may differ.

A source (`InitSource`) is read by whoever can read it: `torchvision_source` here (a torchvision RetinaNet state-dict
file); MLflow models and training checkpoints in `pipelines.training.init_from`, which has MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from retina.config import AnchorConfig, BackboneConfig, HeadConfig, ModelConfig
from retina.head import prior_bias
from retina.model import RetinaNet
from retina.torchvision_compat import torchvision_state_dict
from retina.typed_config import ConfigError

KEY = "model.init_from"
CLS_SCORE = ("head.cls_score.weight", "head.cls_score.bias")
# Config keys the weights depend on (model.<key>). anchors.integer_sizes moves an anchor by under a pixel, and
# backbone.norm frozen_bn / bn hold the same tensors: neither is compared (gn vs bn is, by the tensors' names).
ARCHITECTURE = (
    "backbone.name", "backbone.width", "backbone.fpn_channels", "backbone.p6_input",
    "anchors.sizes", "anchors.scales", "anchors.aspect_ratios", "head.num_convs", "head.norm",
)  # fmt: skip
# torchvision's COCO label list pads the 80 classes to their ids 1..90 with these: never a class to keep.
_PLACEHOLDER_NAMES = ("__background__", "N/A")


@dataclass(frozen=True)
class InitSource:
    """Weights to start from, in this project's key names, with the class name of each of the source's labels."""

    description: str  # how the log and the MLflow tag name it, e.g. "checkpoint /runs/demo/checkpoint_000003"
    state_dict: Mapping[str, torch.Tensor]
    class_names: tuple[str, ...]  # label k of the source is class_names[k]
    config: ModelConfig | None  # its model section; None: unknown (the tensors alone are compared)


@dataclass(frozen=True)
class InitReport:
    """What `initialise` did: which of the model's classes kept the source's weights, which start at the prior."""

    source: str
    kept: tuple[str, ...]
    reinitialised: tuple[str, ...]

    def summary(self) -> str:
        return (f"{self.source}: {len(self.kept)} classes kept{_listed(self.kept)}, {len(self.reinitialised)} "
                f"re-initialised with the prior{_listed(self.reinitialised)}")  # fmt: skip


def _listed(names: Sequence[str], most: int = 10) -> str:
    if not names:
        return ""
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return f" ({', '.join(names[:most])}{more})"


def initialise(model: RetinaNet, source: InitSource, class_names: Sequence[str]) -> InitReport:
    """Load `source` into `model` (in place), whose label k is `class_names[k]`; ConfigError naming ``model.init_from``
    and the first key that differs when the architectures do not match."""
    if len(class_names) != model.cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {model.cfg.num_classes} classes")
    if source.config is not None:
        _check_config(source, model.cfg)
    state = model.state_dict()
    _check_tensors(source, state)
    for key, value in source.state_dict.items():
        if key in state and key not in CLS_SCORE:
            state[key] = value.to(state[key].dtype)
    weight, bias, kept, new = _class_output(model, source, class_names)
    state[CLS_SCORE[0]], state[CLS_SCORE[1]] = weight, bias
    model.load_state_dict(state)
    return InitReport(source.description, tuple(kept), tuple(new))


def _mismatch(source: InitSource, what: str) -> ConfigError:
    return ConfigError(
        f"{KEY}: {source.description} does not fit this model: {what} (the backbone, FPN, anchors and heads must be "
        "the source's; model.num_classes and the classes may differ)"
    )


def _config_value(cfg: ModelConfig, dotted: str) -> object:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _same(a: object, b: object) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)  # anchor scales such as 2^(1/3) through JSON
    return a == b


def _check_config(source: InitSource, cfg: ModelConfig) -> None:
    for dotted in ARCHITECTURE:
        theirs, ours = _config_value(source.config, dotted), _config_value(cfg, dotted)
        if not _same(theirs, ours):
            raise _mismatch(source, f"model.{dotted} is {theirs!r} there, {ours!r} here")


def _optional(key: str) -> bool:
    # BatchNorm2d counts its batches, FrozenBatchNorm2d does not: either side may lack the counter.
    return key.endswith("num_batches_tracked")


def _check_tensors(source: InitSource, state: Mapping[str, torch.Tensor]) -> None:
    theirs = source.state_dict
    for key, value in state.items():
        if key not in theirs:
            if not _optional(key):
                raise _mismatch(source, f"it has no {key}")
        elif key != CLS_SCORE[0] and key != CLS_SCORE[1] and theirs[key].shape != value.shape:
            raise _mismatch(source, f"{key} is {tuple(theirs[key].shape)} there, {tuple(value.shape)} here")
    extra = [k for k in theirs if k not in state and not _optional(k)]
    if extra:
        raise _mismatch(source, f"it has {extra[0]}, which this model lacks")


def _class_output(
    model: RetinaNet, source: InitSource, class_names: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """The class output's weight (A·K, C, 3, 3) and bias (A·K,) for this model's classes, and which were kept."""
    head = model.head
    a, k_new, k_old = head.num_anchors, head.num_classes, len(source.class_names)
    w_old, b_old = source.state_dict[CLS_SCORE[0]], source.state_dict[CLS_SCORE[1]]
    w_new = head.cls_score.weight.detach().clone()  # (A·K, C, 3, 3)
    if w_old.shape[0] != a * k_old or w_old.shape[1:] != w_new.shape[1:]:
        raise _mismatch(source, f"{CLS_SCORE[0]} is {tuple(w_old.shape)} there, not {a} anchors x {k_old} classes x "
                                f"{tuple(w_new.shape[1:])}")  # fmt: skip
    w_old = w_old.to(w_new.dtype).view(a, k_old, *w_old.shape[1:])  # (A, K_src, C, 3, 3)
    b_old = b_old.to(w_new.dtype).view(a, k_old)  # (A, K_src)
    w = w_new.view(a, k_new, *w_new.shape[1:])  # (A, K, C, 3, 3), a view: writing it writes w_new
    b = torch.empty(a, k_new, dtype=w_new.dtype)  # (A, K)
    label_of = {}
    for label, name in enumerate(source.class_names):
        if name not in _PLACEHOLDER_NAMES:
            label_of.setdefault(name, label)
    kept, new = [], []
    for k, name in enumerate(class_names):
        j = label_of.get(name)
        if j is None:
            torch.nn.init.normal_(w[:, k], std=0.01)  # the paper's init (RetinaNetHead's): the same on every rank
            b[:, k] = prior_bias(model.cfg.head.prior)
            new.append(name)
        else:
            w[:, k], b[:, k] = w_old[:, j], b_old[:, j]
            kept.append(name)
    return w_new, b.reshape(-1), kept, new


# ------------------------------------------------------------------------------------------------ torchvision


def torchvision_config(num_classes: int = 91) -> ModelConfig:
    """What torchvision's ``retinanet_resnet50_fpn`` is in this project's config (what `from_torchvision` reads off
    one): R50-FPN with P6 from P5, its integer anchor sizes, the paper's head."""
    return ModelConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(name="resnet50", width=64, norm="frozen_bn", fpn_channels=256, p6_input="p5"),
        anchors=AnchorConfig(integer_sizes=True),
        head=HeadConfig(num_convs=4, norm="none"),
    )


def torchvision_source(path: str | Path) -> InitSource:
    """A file holding ``torchvision.models.detection.retinanet_resnet50_fpn(...).state_dict()`` (saved with
    ``torch.save``): its weights in this project's names, labelled with COCO's 91 category names (torchvision's
    label = COCO category id)."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, or a pickle with code in it
        what = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{KEY}: cannot read {path} as a torchvision state dict: {what}") from None
    if not isinstance(state, Mapping) or "head.classification_head.cls_logits.weight" not in state:
        raise ConfigError(f"{KEY}: {path} is not a torchvision RetinaNet state dict (no head.classification_head)")
    names = tuple(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    rows = state["head.classification_head.cls_logits.weight"].shape[0]
    config = torchvision_config(len(names))
    anchors = len(config.anchors.scales) * len(config.anchors.aspect_ratios)
    if rows != anchors * len(names):
        raise ConfigError(f"{KEY}: {path} scores {rows // anchors} classes per anchor, not COCO's {len(names)}: "
                          "only torchvision's COCO-labelled RetinaNet has known class names")  # fmt: skip
    return InitSource(f"torchvision state dict {path}", torchvision_state_dict(state), names, config)
