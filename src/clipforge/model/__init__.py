"""The CLIP model: configs and presets, the two towers, and the composed `CLIP`.

The modules form a one-way chain, each importing only those before it:

- `config`: the dataclass configs, the presets, OpenAI's constants and the input-shape check;
- `transformer`: the pre-LN Transformer every tower shares, with a hook for a faster path;
- the towers: `vision` (ViT), `resnet` (OpenAI's modified ResNet), `text`, `siglip` (SigLIP's
  attention-pooled ViT and non-causal text tower) and `bert` (Chinese-CLIP's BERT text tower);
- `_inference`: the packed fp32 CPU path, which fills the towers' hooks;
- `clip`: the composed `CLIP`, whose ``optimize_for_inference`` calls `_inference`.
"""

from clipforge.model.bert import BertTextTransformer
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig, get_config, list_presets
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.siglip import SigLipTextTransformer, SigLipVisionTransformer
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
    "SigLipVisionTransformer",
    "SigLipTextTransformer",
    "BertTextTransformer",
]
