"""The pre-LayerNorm Transformer shared by every tower.

Parameter names follow OpenAI's CLIP (``clip/model.py``), which used ``nn.MultiheadAttention``:
``attn.in_proj_weight`` (q, k and v stacked), ``attn.in_proj_bias``, ``attn.out_proj``,
``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``.  OpenAI and OpenCLIP weights therefore load
without renaming.  Attention runs through ``F.scaled_dot_product_attention``.

Both towers read one token out of the last block (the class token, or the end-of-text token),
so `Transformer.forward_pooled` runs the last block for that token only: keys and values for
every position, queries and the MLP for one.  The result equals the full forward at that token.

A faster path for `forward_pooled` (and `forward`) can be plugged in from outside: anything with
the `PooledPath` interface, held in ``Transformer._packed``.  `CLIP.optimize_for_inference` fills it
with ``_inference.PackedTransformer`` (fp32 on the CPU); this module does not know that kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "QUICK_GELU_SCALE", "QuickGELU", "make_activation", "Attention", "MLP", "ResidualAttentionBlock", "PooledPath",
    "Transformer",
]

# GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel, 2016, section 2); OpenAI's CLIP trained with it
# (``QuickGELU`` in clip/model.py).
QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def make_activation(name: str) -> nn.Module:
    """The MLP activation called ``name``: "gelu" (exact, erf-based), "quick_gelu" or "gelu_tanh"
    (GELU's tanh approximation, SigLIP's: transformers' "gelu_pytorch_tanh", timm's "gelu_tanh")."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected 'gelu', 'quick_gelu' or 'gelu_tanh'")


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, *, causal: bool = False) -> Tensor:
        B, L, D = x.shape
        H = self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, D/H]
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.out_proj(y)

    def forward_query(self, x: Tensor, query: Tensor, index: Tensor | None) -> Tensor:
        """Attention output for one query row per sequence.

        ``x`` holds every position (keys and values), ``query`` the query row's input;
        ``index`` (the query's position) limits the keys to positions up to it (causal), or
        None lets it see all of them.
        """
        B, L, D = x.shape
        H = self.heads
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = F.linear(query, w_q, b_q).view(B, 1, H, D // H).transpose(1, 2)  # [B, H, 1, D/H]
        kv = F.linear(x, w_kv, b_kv)  # [B, L, 2D]
        k, v = kv.view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, L, D/H]
        mask = None
        if index is not None:
            positions = torch.arange(L, device=x.device)
            mask = (positions[None, :] <= index[:, None]).view(B, 1, 1, L)  # [B, 1, 1, L]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, 1, D/H]
        y = y.transpose(1, 2).reshape(B, 1, D)  # [B, 1, D]
        return self.out_proj(y)


class MLP(nn.Sequential):
    """c_fc -> act -> c_proj, named as in OpenAI's checkpoints (``act`` holds no parameters)."""

    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, *, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def forward_query(self, x: Tensor, index: Tensor, causal: bool = False) -> Tensor:
        """The block's output at position ``index[b]`` of each sequence b: [B, D]."""
        rows = torch.arange(x.shape[0], device=x.device)
        query = x[rows, index].unsqueeze(1)  # [B, 1, D]
        h = self.ln_1(x)
        y = query + self.attn.forward_query(h, h[rows, index].unsqueeze(1), index if causal else None)
        y = y + self.mlp(self.ln_2(y))  # [B, 1, D]
        return y.squeeze(1)  # [B, D]


class PooledPath(Protocol):
    """Another way to compute `Transformer.forward_pooled`, used for the inputs it applies to."""

    def applies(self, x: Tensor) -> bool:
        """Whether ``forward_pooled(x, ...)`` here equals the plain modules' result."""
        ...

    def forward_pooled(self, x: Tensor, index: Tensor, *, causal: bool) -> Tensor:
        """[B, L, D] -> [B, D], as `Transformer.forward_pooled`."""
        ...

    def forward(self, x: Tensor, *, causal: bool) -> Tensor:
        """[B, L, D] -> [B, L, D], as `Transformer.forward`."""
        ...


class Transformer(nn.Module):
    """A stack of pre-LN residual attention blocks (``resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int, *, mlp_width: int, act: str, eps: float) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width=mlp_width, act=act, eps=eps)
            for _ in range(layers)
        )
        self.grad_checkpointing = False
        self._packed: PooledPath | None = None  # a faster forward(_pooled), installed from outside
        self.init_weights()

    @classmethod
    def from_config(cls, config: Any) -> Transformer:
        """The blocks a tower config describes (``width``, ``layers``, ``heads``,
        ``mlp_width``, ``act``, ``layer_norm_eps``: `VisionConfig` and `TextConfig` both)."""
        return cls(config.width, config.layers, config.heads, mlp_width=config.mlp_width,
                   act=config.act, eps=config.layer_norm_eps)

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI's initialisation of its text Transformer (``CLIP.initialize_parameters``).

        OpenAI applied it to the text tower only and left its ViT at PyTorch's defaults; one
        scheme for both towers keeps training from scratch uniform.
        """
        n = len(self.resblocks)
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * n) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def _run(self, fn: Callable[..., Tensor], *args: object) -> Tensor:
        """``fn(*args)``, recomputed in the backward pass when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: Tensor, *, causal: bool = False) -> Tensor:
        """Every position through every block: [B, L, D] -> [B, L, D].

        Runs through ``self._packed`` when one is installed and applies to ``x``.
        """
        if self._packed is not None and self._packed.applies(x):
            return self._packed.forward(x, causal=causal)
        for block in self.resblocks:
            x = self._run(block, x, causal)
        return x

    def forward_pooled(self, x: Tensor, index: Tensor, *, causal: bool = False) -> Tensor:
        """The output at position ``index[b]`` of each sequence: [B, L, D] -> [B, D].

        Equals ``forward(x)[arange(B), index]``; the last block computes that row only.  Runs
        through ``self._packed`` when one is installed and applies to ``x``.
        """
        if self._packed is not None and self._packed.applies(x):
            return self._packed.forward_pooled(x, index, causal=causal)
        *blocks, last = self.resblocks
        for block in blocks:
            x = self._run(block, x, causal)
        return self._run(last.forward_query, x, index, causal)
