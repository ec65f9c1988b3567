"""retina: RetinaNet (Lin et al., 2017) with a fused focal loss. Pure PyTorch + torchvision + pycocotools.

The names below load on first use (PEP 562): importing a light submodule (``retina.config``, ``retina.data.coco``)
must not import the model and torchvision, which costs seconds in every Ray Data decode task and Ray actor
process that only needs the light part.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "retina.config",
    "load_model_config": "retina.config",
    "RetinaNet": "retina.model",
    "build_retinanet": "retina.model",
    "from_torchvision": "retina.torchvision_compat",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retina' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
