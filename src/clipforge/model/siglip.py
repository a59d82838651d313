"""SigLIP's two towers (Zhai et al., 2023; SigLIP 2: Tschannen et al., 2025) on the shared `Transformer`.

    model = CLIP(get_config("ViT-B-16-SigLIP"))  # picks these towers: config.vision.pool == "map"
    logits = model.logits(image_features, text_features)  # scale * cos + bias

The image tower is a ViT without a class token: a patch convolution with bias, learned position
embeddings, no LayerNorm before the blocks, one after them on every token, and a multi-head
attention-pooling ("MAP") head: a learned probe attends over the tokens, then a LayerNorm and an
MLP add a residual (big_vision's ``MAPHead``; transformers' ``SiglipMultiheadAttentionPoolingHead``,
timm's ``AttentionPoolLatent``).  Its output is the embedding: there is no projection.

The text tower is non-causal and read at its last position (the padding, when a caption is
shorter than the context), then a linear head with bias.  Padding is therefore part of the
input: captions must be padded as the model was trained (to the full context, in SigLIP).

SigLIP 2's NaFlex image tower (``config.vision.max_num_patches`` set; transformers' ``Siglip2Model``)
is the same ViT fed another way: each image comes at its own grid of patches, packed with flags
(`clipforge.transforms.pack_patches`), the patch convolution's weight applied to each flattened
patch, and the learned grid of positions resized to the image's grid (bilinear, antialiased).
transformers pads every image to ``max_num_patches`` and masks the padding in attention and in the
head; here the images of one patch count run together without padding, which is the same sum
(a masked key has weight zero) without the masked work.

Tensor names, under ``visual.`` and ``text.``: ``conv1``, ``positional_embedding``,
``transformer``, ``ln_post`` and ``attn_pool`` (``probe``, ``attn``, ``ln``, ``mlp``);
``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final`` and
``text_projection`` (an ``nn.Linear``, as in OpenCLIP's SigLIP text tower).
`clipforge.checkpoints.names` maps them to transformers' and timm's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.model.config import TextConfig, VisionConfig, check_image_shape
from clipforge.model.transformer import MLP, Attention, Transformer
from clipforge.model.vision import PatchPath
from clipforge.transforms import NAFLEX_FLAGS, unpack_patches

__all__ = ["AttentionPool", "SigLipTextTransformer", "SigLipVisionTransformer"]


class AttentionPool(nn.Module):
    """Multi-head attention pooling: tokens [B, L, D] -> one vector [B, D].

    A learned probe is the one query; keys and values come from every token (no LayerNorm
    before, as in big_vision); then y + mlp(ln(y)).
    """

    def __init__(self, width: int, heads: int, *, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = Attention(width, heads)  # nn.MultiheadAttention's names: in_proj_weight (q, k, v), out_proj
        self.ln = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """big_vision's MAPHead: Xavier-uniform probe; nn.MultiheadAttention's Xavier-uniform q, k, v."""
        nn.init.xavier_uniform_(self.probe.view(1, -1))
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.zeros_(self.attn.in_proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        probe = self.probe.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        y = self.attn.forward_query(x, probe, None)  # [B, 1, D]: no mask, every token is a key
        y = y + self.mlp(self.ln(y))
        return y[:, 0]  # [B, D]


class SigLipVisionTransformer(nn.Module):
    """Images [B, 3, S, S] -> features [B, width], pooled by the attention-pooling head.

    A NaFlex tower (``config.max_num_patches``) takes packed patches [B, P, 2 + 3 * patch**2]
    (`clipforge.transforms.naflex_transform`), or images [B, 3, H, W] at their grid of whole
    patches (a remainder is dropped, as the convolution drops it).
    """

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        if config.is_resnet or config.pool != "map":
            raise ValueError(f"SigLipVisionTransformer needs a ViT config with pool='map', got pool={config.pool!r}")
        if output_dim != config.width:
            raise ValueError(f"SigLIP's image tower has no projection: output_dim={output_dim} must equal "
                             f"width={config.width}")
        self.image_size = config.image_size
        self.naflex = config.naflex
        width, patch, grid = config.width, config.patch_size, config.grid
        self.patch_size, self.grid = patch, grid
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch)  # with bias
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid, width))
        self.transformer = Transformer.from_config(config)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn_pool = AttentionPool(width, config.heads, mlp_width=config.mlp_width, act=config.act,
                                       eps=config.layer_norm_eps)
        self._packed_patches: PatchPath | None = None  # a faster conv1, installed from outside
        nn.init.normal_(self.positional_embedding, std=width**-0.5)  # big_vision's learned posemb

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, images: Tensor) -> Tensor:
        if self.naflex:
            return self._forward_naflex(images)
        check_image_shape(images, self.image_size)
        if self._packed_patches is not None and self._packed_patches.applies(images):
            x = self._packed_patches(images)  # [B, grid*grid, width]
        else:
            x = self.conv1(images)  # [B, width, grid, grid]: a remainder of S / patch is dropped
            x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        return self._encode(x + self.positional_embedding.to(x.dtype))

    def _encode(self, x: Tensor) -> Tensor:
        """Embedded patches [B, N, width] -> features [B, width]."""
        x = self.transformer(x)  # [B, N, width]: the head reads every token
        x = self.ln_post(x)
        return self.attn_pool(x)  # [B, width]

    # ------------------------------------------------------------------ NaFlex
    def _positions(self, rows: int, columns: int) -> Tensor:
        """The learned grid of positions resized to rows x columns: [rows * columns, width].

        transformers' Siglip2VisionEmbeddings: bilinear, antialiased when shrinking, in float32.
        """
        width = self.positional_embedding.shape[-1]
        grid = self.positional_embedding.float().reshape(1, self.grid, self.grid, width).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(rows, columns), mode="bilinear", align_corners=False, antialias=True)
        return resized[0].reshape(width, rows * columns).T  # [rows*columns, width], raster order

    def _naflex_inputs(self, images: Tensor) -> list[tuple[Tensor, tuple[int, int]]]:
        """(patches [rows * columns, P*P*3], (rows, columns)) per image, patches flattened row, column, channel."""
        P, K = self.patch_size, 3 * self.patch_size**2
        if images.ndim == 4 and images.shape[1] == 3:
            B, _, H, W = images.shape
            rows, columns = H // P, W // P
            if rows == 0 or columns == 0:
                raise ValueError(f"images of {H}x{W} pixels are smaller than one {P}-pixel patch")
            x = images[:, :, : rows * P, : columns * P].reshape(B, 3, rows, P, columns, P)
            x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, rows * columns, K)  # [B, N, P*P*3]
            return [(patches, (rows, columns)) for patches in x]
        if images.ndim != 3 or images.shape[-1] != NAFLEX_FLAGS + K:
            raise ValueError(f"expected NaFlex patches [B, P, {NAFLEX_FLAGS + K}] (clipforge.transforms."
                             f"naflex_transform) or images [B, 3, H, W], got {list(images.shape)}")
        return unpack_patches(images)

    def _forward_naflex(self, images: Tensor) -> Tensor:
        items = self._naflex_inputs(images)
        D = self.positional_embedding.shape[-1]
        weight = self.conv1.weight.permute(0, 2, 3, 1).reshape(D, -1)  # [D, P*P*3]: a patch's row, column, channel
        positions: dict[tuple[int, int], Tensor] = {}
        groups: dict[int, list[int]] = {}  # images of one patch count run as one batch
        for index, (patches, grid) in enumerate(items):
            groups.setdefault(len(patches), []).append(index)
            if grid not in positions:
                positions[grid] = self._positions(*grid)
        order, features = [], []
        for indices in groups.values():
            x = torch.stack([items[i][0] for i in indices])  # [b, N, P*P*3]
            x = F.linear(x.to(weight.dtype), weight, self.conv1.bias)  # [b, N, D]
            pos = torch.stack([positions[items[i][1]] for i in indices])  # [b, N, D]
            features.append(self._encode(x + pos.to(x.dtype)))  # [b, D]
            order += indices
        out = torch.cat(features)  # [B, D] in group order
        return out[torch.tensor(order, device=out.device).argsort()]


class SigLipTextTransformer(nn.Module):
    """Token ids [B, L] -> features [B, output_dim] at the last position, L <= context_length."""

    def __init__(self, config: TextConfig, output_dim: int) -> None:
        super().__init__()
        if config.pool != "last":
            raise ValueError(f"SigLipTextTransformer needs a text config with pool='last', got {config.pool!r}")
        self.context_length = config.context_length
        self.vocab_size = config.vocab_size
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer.from_config(config)
        self.ln_final = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_projection = nn.Linear(width, output_dim)
        with torch.no_grad():  # big_vision's text encoder: both embeddings normal(1/sqrt(width))
            nn.init.normal_(self.token_embedding.weight, std=width**-0.5)
            nn.init.normal_(self.positional_embedding, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"expected token ids of shape [B, L], got {list(tokens.shape)}")
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(f"token ids of length {L} exceed the model's context_length={self.context_length} "
                             f"(tokens of shape {list(tokens.shape)})")
        x = self.token_embedding(tokens)  # [B, L, width]
        x = x + self.positional_embedding[:L].to(x.dtype)
        last = torch.full((B,), L - 1, dtype=torch.long, device=tokens.device)
        x = self.transformer.forward_pooled(x, last)  # [B, width]: non-causal, the last block for one row
        x = self.ln_final(x)
        return self.text_projection(x)  # [B, output_dim]
