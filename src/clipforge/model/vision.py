"""The Vision Transformer image tower (OpenAI's modified ResNet is in `resnet.py`).

The ViT follows OpenAI's ``VisionTransformer`` (``clip/model.py``) and keeps its parameter
names: a bias-free patch convolution ``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, the pre-LN ``transformer``, ``ln_post`` on the class token and ``proj``.

A faster patch embedding can be plugged in from outside, as the `Transformer`'s pooled path
can: anything with the `PatchPath` interface, held in ``VisionTransformer._packed_patches``
(`CLIP.optimize_for_inference` fills it).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from clipforge.model.config import VisionConfig, check_image_shape
from clipforge.model.transformer import Transformer

__all__ = ["PatchPath", "VisionTransformer"]


class PatchPath(Protocol):
    """Another way to compute the patch embedding, used for the inputs it applies to."""

    def applies(self, images: Tensor) -> bool:
        """Whether the result here equals the plain convolution's for ``images``."""
        ...

    def __call__(self, images: Tensor) -> Tensor:
        """Images [B, 3, S, S] -> patch features [B, (S/P)^2, D], as conv1 + flatten + transpose."""
        ...


class VisionTransformer(nn.Module):
    """Images [B, 3, S, S] -> features [B, output_dim] read at the class token."""

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if config.is_resnet:
            raise ValueError("VisionTransformer needs VisionConfig.patch_size; got None (a ResNet)")
        self.image_size = config.image_size
        width, patch = config.width, config.patch_size
        grid = config.image_size // patch
        scale = width**-0.5  # OpenAI's init for the embeddings and the projection
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer.from_config(config)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self._packed_patches: PatchPath | None = None  # a faster conv1, installed from outside

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, images: Tensor) -> Tensor:
        check_image_shape(images, self.image_size)
        if self._packed_patches is not None and self._packed_patches.applies(images):
            x = self._packed_patches(images)  # [B, grid*grid, width], one matrix multiply
        else:
            x = self.conv1(images)  # [B, width, grid, grid]
            x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        B, D = x.shape[0], x.shape[2]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, D)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1)  # [B, grid*grid + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        index = torch.zeros(B, dtype=torch.long, device=x.device)  # the class token
        x = self.transformer.forward_pooled(x, index)  # [B, width]
        x = self.ln_post(x)
        return x @ self.proj  # [B, output_dim]
