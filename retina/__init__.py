"""retina: RetinaNet (Lin et al., 2017) with a fused focal loss. Pure PyTorch + torchvision + pycocotools."""

from retina.config import ModelConfig, load_model_config
from retina.model import RetinaNet, build_retinanet
from retina.torchvision_compat import from_torchvision

__all__ = ["ModelConfig", "RetinaNet", "build_retinanet", "from_torchvision", "load_model_config"]
