"""clipforge — CLIP, contrastive language–image pretraining: the loss, the model,
training and applications.

    import clipforge
    model, preprocess, tokenizer = clipforge.load("ViT-B-32", pretrained="openai")  # or a checkpoint path
    clipforge.list_pretrained("laion2b")                           # the released weights it knows by name
    ready = clipforge.load_for_inference("ViT-B-32.pt")            # + device and precision, for use
    loss = clipforge.clip_loss(img, txt, model.logit_scale(), chunk_size="auto")

Importing the package has no side effects; submodules are imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipforge.loss import ClipLoss, LogitScale, SigLipLoss, clip_loss, siglip_loss

__version__ = "0.1.0"

__all__ = [
    "ClipLoss", "SigLipLoss", "LogitScale", "clip_loss", "siglip_loss",
    "CLIP", "CLIPConfig", "get_config", "load", "load_for_inference", "convert", "save", "RandomWeightsWarning",
    "list_pretrained", "CheckpointError", "DownloadError", "UnknownModelError",
    "Tokenizer", "tokenize", "image_transform",
    "__version__",
]

# Lazily imported names: `import clipforge` stays cheap and the loss needs none of them.
_LAZY = {
    "CLIP": "clipforge.model",
    "CLIPConfig": "clipforge.model",
    "get_config": "clipforge.model",
    "load": "clipforge.checkpoints",
    "load_for_inference": "clipforge.checkpoints",
    "convert": "clipforge.checkpoints",
    "save": "clipforge.checkpoints",
    "RandomWeightsWarning": "clipforge.checkpoints",
    "list_pretrained": "clipforge.checkpoints.registry",
    "CheckpointError": "clipforge.checkpoints",
    "DownloadError": "clipforge.checkpoints",
    "UnknownModelError": "clipforge.checkpoints",
    "Tokenizer": "clipforge.tokenizer",
    "tokenize": "clipforge.tokenizer",
    "image_transform": "clipforge.transforms",
}

if TYPE_CHECKING:  # pragma: no cover
    from clipforge.checkpoints import (
        CheckpointError,
        DownloadError,
        RandomWeightsWarning,
        UnknownModelError,
        convert,
        load,
        load_for_inference,
        save,
    )
    from clipforge.checkpoints.registry import list_pretrained
    from clipforge.model import CLIP, CLIPConfig, get_config
    from clipforge.tokenizer import Tokenizer, tokenize
    from clipforge.transforms import image_transform


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazily imported ones, which `__getattr__` alone would hide from
    ``dir()`` and tab completion."""
    return sorted(set(globals()) | set(_LAZY))
