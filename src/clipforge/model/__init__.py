"""The CLIP model: configs and presets, the two towers, and the composed `CLIP`."""

from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig, get_config, list_presets
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.text import TextTransformer
from clipforge.model.vision import VisionTransformer

__all__ = [
    "CLIP",
    "CLIPConfig",
    "VisionConfig",
    "TextConfig",
    "get_config",
    "list_presets",
    "VisionTransformer",
    "ModifiedResNet",
    "TextTransformer",
]
