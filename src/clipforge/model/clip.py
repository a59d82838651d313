"""CLIP: an image tower and a text tower mapping into one embedding space, and a logit scale.

    model = CLIP(get_config("ViT-B-32"))
    image_features, text_features, logit_scale = model(images, tokens)  # normalised features
    logits = logit_scale * image_features @ text_features.T
    logits = model.logits(image_features, text_features)  # the same, plus SigLIP's bias if it has one

The same class holds SigLIP's towers when the config asks for them (`clipforge.model.siglip`), and
Chinese-CLIP's BERT text tower (`clipforge.model.bert`).
The loss lives in `clipforge.loss`; the model only returns features.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.loss import LogitScale
from clipforge.model import _inference
from clipforge.model.bert import BertTextTransformer
from clipforge.model.config import CLIPConfig
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.siglip import SigLipTextTransformer, SigLipVisionTransformer
from clipforge.model.text import TextTransformer
from clipforge.model.vision import VisionTransformer

__all__ = ["CLIP", "VocabularyError"]



class VocabularyError(ValueError):
    """Token ids outside the model's vocabulary: text encoded by another model's tokenizer."""

class CLIP(nn.Module):
    """Contrastive language-image model (Radford et al., 2021).

    Submodules: ``visual`` (a `VisionTransformer`, `ModifiedResNet` or, for SigLIP,
    `SigLipVisionTransformer`), ``text`` (a `TextTransformer`, SigLIP's
    `SigLipTextTransformer` or Chinese-CLIP's `BertTextTransformer`) and ``logit_scale`` (a
    `LogitScale`, with SigLIP's bias).
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        if config.vision.is_resnet:
            self.visual: nn.Module = ModifiedResNet(config.vision, config.embed_dim)
        elif config.vision.pool == "map":
            self.visual = SigLipVisionTransformer(config.vision, config.embed_dim)
        else:
            self.visual = VisionTransformer(config.vision, config.embed_dim)
        towers = {"last": SigLipTextTransformer, "cls": BertTextTransformer}
        self.text = towers.get(config.text.pool, TextTransformer)(config.text, config.embed_dim)
        self.logit_scale = LogitScale(config.init_logit_scale, init_bias=config.init_logit_bias)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        """Tokens a caption is padded or cut to (`TextConfig.tokens`: 52 for Chinese-CLIP's 512 positions)."""
        return self.config.text.tokens

    def encode_image(self, images: Tensor, *, normalize: bool = False) -> Tensor:
        """Image features [B, embed_dim] for images [B, 3, S, S], L2-normalised if asked."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, *, normalize: bool = False) -> Tensor:
        """Text features [B, embed_dim] for token ids [B, L], L2-normalised if asked.

        An id outside the vocabulary is a ValueError naming it (a tokenizer with more ids than
        the embedding table), not an index error deep in the embedding, or a device assert."""
        vocab = self.config.text.vocab_size
        if tokens.numel() and not tokens.is_floating_point():
            low, top = torch.stack(torch.aminmax(tokens)).tolist()  # one pass, one device sync for both ends
            if top >= vocab or low < 0:
                bad = top if top >= vocab else low
                raise VocabularyError(f"token id {bad} is outside the model's vocabulary of {vocab} ids: the "
                                      "tokenizer is not the one the model was trained with")
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, text features, logit scale): features L2-normalised, scale 0-dim."""
        return (
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale(),
        )

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Scores [N_images, N_texts]: scale * cosine similarity, plus the learned bias if the
        model has one (SigLIP, whose sigmoid of each score is a probability)."""
        cos = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        logits = self.logit_scale() * cos
        bias = self.logit_scale.bias
        return logits if bias is None else logits + bias

    def optimize_for_inference(self, enable: bool = True) -> CLIP:
        """Faster fp32 CPU inference with the same outputs (within fp32 rounding); returns self.

        The Transformer towers' linear layers run through oneDNN with weights packed once and
        bias, GELU and residual fused (`_inference.py`, measured in docs/benchmarks.md).  Used
        only for fp32 inputs on the CPU with gradients off and no autocast; training, bf16 and
        GPUs run the plain modules.  Costs one more copy of the Transformer weights; the
        ResNet image tower is left as it is.  ``enable=False`` drops the packed copies.
        """
        if enable and not _inference.available():
            warnings.warn("this PyTorch build lacks oneDNN; optimize_for_inference does nothing", stacklevel=2)
            return self
        _inference.install(self.visual, enable=enable)
        _inference.install(self.text, enable=enable)
        return self

    def set_grad_checkpointing(self, *, image: bool = True, text: bool = True) -> None:
        """Recompute each tower's blocks in the backward pass instead of storing activations."""
        self.visual.set_grad_checkpointing(image)
        self.text.set_grad_checkpointing(text)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
