"""ResNet / ResNeXt + FPN producing P3–P7, built from torchvision's parts (same module names and weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

# torchvision's builders: the standard networks at width 64.
_BUILDERS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext101_32x8d": resnet.resnext101_32x8d,
}


# Block type and blocks per stage of the names ScaledResNet builds (any width). ResNet-10 (one block per stage, as
# in timm's resnet10t; torchvision has no builder for it) costs about half of ResNet-18: for small models trained
# from scratch.
_STAGES: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (resnet.Bottleneck, [3, 4, 23, 3]),
}


class ScaledResNet(resnet.ResNet):
    """torchvision's ResNet with the stem and stages `width`, 2·, 4·, 8·`width` planes wide (64: the standard
    network). Module names are torchvision's, so state dicts keep its layout; no classifier is built."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        width: int = 64,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64 planes; rebuild its layout at `width` instead
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


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
    width: int = 64,
) -> BackboneWithFPN:
    """Returns a module mapping (B, 3, H, W) → OrderedDict of 5 maps P3..P7, each (B, fpn_channels, H/s, W/s)."""
    if name not in _BUILDERS and name not in _STAGES:
        raise ValueError(f"backbone.name must be one of {sorted({*_BUILDERS, *_STAGES})}, got {name!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"backbone.trainable_layers must be in 0..5, got {trainable_layers}")
    if width == 64 and name in _BUILDERS:
        net = _BUILDERS[name](weights=None, norm_layer=_norm_layer(norm))
    elif name in _STAGES:
        net = ScaledResNet(*_STAGES[name], width=width, norm_layer=_norm_layer(norm))
    else:
        raise ValueError(f"backbone.width={width} needs one of {sorted(_STAGES)}, not {name!r}")
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
    c3 = net.inplanes // 4  # channels of C3 (inplanes ends as C5): 2·width (BasicBlock) or 8·width (Bottleneck)
    in_channels = [c3, c3 * 2, c3 * 4]  # C3, C4, C5
    p6_in = in_channels[-1] if p6_input == "c5" else fpn_channels
    # LastLevelP6P7 reads P5 when its in/out channels are equal; a C5 as wide as the FPN (a width-32 ResNet-18
    # under a 256-channel FPN) would silently switch to P5, so the choice is checked.
    extra = LastLevelP6P7(p6_in, fpn_channels)
    if extra.use_P5 != (p6_input == "p5"):
        raise ValueError(f"p6_input={p6_input!r} cannot be expressed with C5 channels {in_channels[-1]}")
    return BackboneWithFPN(
        net, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, fpn_channels, extra_blocks=extra
    )
