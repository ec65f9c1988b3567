"""ResNet / ResNeXt + FPN producing P3–P7, built from torchvision's parts (same module names and weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

_BUILDERS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x8d": resnet.resnext101_32x8d,
}


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"backbone.norm must be frozen_bn, bn or gn, got {norm!r}")


def load_backbone_weights(net: resnet.ResNet, weights: str | dict) -> None:
    """Load an ImageNet state dict (torchvision layout; a path or a dict) into the ResNet trunk.

    The classifier (fc.*) is not part of the detector and is dropped; any other mismatch is an error naming the
    keys, because silently training from random init after a typo'd path is the worst outcome.
    """
    state = torch.load(weights, map_location="cpu", weights_only=True) if isinstance(weights, str) else weights
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {weights if isinstance(weights, str) else '<dict>'} do not fit: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )


def build_backbone(
    name: str = "resnet50",
    weights: str | dict | None = None,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    fpn_channels: int = 256,
    p6_input: str = "c5",
) -> BackboneWithFPN:
    """Returns a module mapping (B, 3, H, W) → OrderedDict of 5 maps P3..P7, each (B, fpn_channels, H/s, W/s)."""
    if name not in _BUILDERS:
        raise ValueError(f"backbone.name must be one of {sorted(_BUILDERS)}, got {name!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone.trainable_layers must be in 0..5, got {trainable_layers}")
    net = _BUILDERS[name](weights=None, norm_layer=_norm_layer(norm))
    if weights is not None:
        load_backbone_weights(net, weights)
    # Freeze from the bottom as torchvision does: the stem and early stages learn generic edges that a small
    # detection batch would only disturb.
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for pname, param in net.named_parameters():
        if not any(pname.startswith(layer) for layer in layers_to_train):
            param.requires_grad_(False)
    c3 = net.inplanes // 4  # channels of C3 (inplanes ends as C5): 128 (BasicBlock) or 512 (Bottleneck)
    in_channels = [c3, c3 * 2, c3 * 4]  # C3, C4, C5
    p6_in = in_channels[-1] if p6_input == "c5" else fpn_channels
    # LastLevelP6P7 reads P5 when its in/out channels are equal; a 256-channel C5 (never the case for ResNets
    # here) would silently switch to P5, so the choice is checked.
    extra = LastLevelP6P7(p6_in, fpn_channels)
    if extra.use_P5 != (p6_input == "p5"):
        raise ValueError(f"p6_input={p6_input!r} cannot be expressed with C5 channels {in_channels[-1]}")
    return BackboneWithFPN(
        net, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, fpn_channels, extra_blocks=extra
    )
