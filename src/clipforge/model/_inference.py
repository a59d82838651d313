"""An exact, faster fp32 CPU inference path for the Transformer towers (`CLIP.optimize_for_inference`).

    model = CLIP(get_config("ViT-B-32")).optimize_for_inference()
    with torch.inference_mode():
        features = model.encode_image(images)  # equal to the plain path within fp32 rounding

What it changes, and why (measured in docs/benchmarks.md, "The model"): every linear layer of the
Transformer blocks (and the ViT's patch convolution, as the matrix multiply it is) keeps a copy of
its weight reordered once into oneDNN's blocked layout, and runs through the oneDNN primitive
that PyTorch's own compiler uses for frozen CPU graphs (``torch.ops.mkldnn._linear_pointwise``)
with the bias, the exact (erf) GELU and the residual addition done on the output tile while it
is still in cache.  The math stays fp32 and is the same sum of the same products; only the
order of the additions inside each dot product changes, as between two BLAS libraries.

The plain modules' ``nn.Linear`` calls ``addmm``, which first copies the bias into the output
and then runs MKL on the weight as stored; for the few rows of a batch-1 image (50 tokens) or a
caption (~20 tokens) MKL reaches a fraction of the speed it has on large batches, and the bias,
GELU and residual passes come on top.  Where oneDNN is not ahead (one row, more than 512 rows,
layers smaller than 512 x 512) a layer runs exactly as the plain module does.

The path runs only where it is exact and valid: fp32 tensors on the CPU, gradients off, no
autocast; anywhere else the plain modules run.  The packed copies are refreshed when a weight
changes (an optimizer step, ``load_state_dict``), are not part of the ``state_dict``, and are
dropped by ``copy.deepcopy`` and pickling (the copy runs the plain path).  They cost one more
copy of the packed layers' weights in memory.

The towers do not import this module: `install` puts the packed objects into their hooks
(``Transformer._packed``, a `PooledPath`; ``VisionTransformer._packed_patches``, a `PatchPath`),
and each tower asks its hook whether it `applies` before using it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.model.siglip import SigLipTextTransformer, SigLipVisionTransformer
from clipforge.model.text import TextTransformer
from clipforge.model.transformer import ResidualAttentionBlock, Transformer
from clipforge.model.vision import VisionTransformer

__all__ = ["available", "applies", "install", "PackedTransformer", "PackedPatchEmbedding"]

# Rows the weight layout is chosen for.  oneDNN picks the same blocked layout for anything from
# a caption (~15 rows) to a batch of 32 images (1600 rows); one row would pick another.
_LAYOUT_ROWS = 64
# Row counts for which the packed oneDNN call beats MKL's (1 thread, weights streamed from memory
# as in a forward pass; benchmarks/bench_model.py): one row is a matrix-vector product, where
# MKL is ahead, and past a few hundred rows MKL's own packing pays for itself and the two are
# level.  Outside this range the layer runs exactly as the plain module does.
_PACKED_ROWS = range(2, 513)
# Below this many weights (a 512 x 512 layer) a oneDNN call's fixed cost (tens of microseconds)
# outweighs its gain, and the layer runs as the plain module does: tiny models stay as they are.
_PACKED_MIN_WEIGHTS = 512 * 512


def available() -> bool:
    """Whether this PyTorch build has the oneDNN ops the path needs."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight"))


def applies(x: Tensor) -> bool:
    """Whether the packed path computes what the plain modules would for input ``x``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu"))


def _none() -> None:
    return None


class _Packed(ABC):
    """Frozen copies of some parameters; refreshed when they change, dropped by copies."""

    def __init__(self, params: list[Tensor]) -> None:
        self._params = params
        self._stamp = self._current()
        self._pack()

    def _current(self) -> tuple[tuple[int, int], ...]:
        # _version counts in-place writes (optimizer steps, load_state_dict's copy_); data_ptr
        # catches `param.data = ...`.
        return tuple((p._version, p.data_ptr()) for p in self._params)

    def refresh(self) -> None:
        """Re-pack if any source parameter changed since packing."""
        stamp = self._current()
        if stamp != self._stamp:
            self._pack()
            self._stamp = stamp

    @abstractmethod
    def _pack(self) -> None:
        """(Re)builds the packed copies from the live parameters."""

    def __deepcopy__(self, memo: dict) -> None:
        return None  # the copy's owner sees None: it runs the plain path (oneDNN tensors do not copy)

    def __reduce__(self) -> tuple:
        return (_none, ())


class _Linear:
    """y = x W^T + b for x [M, K], W held in oneDNN's blocked layout, with a fused epilogue."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        # The live parameters (the owner re-packs before a forward pass if they changed).
        self.plain_weight = weight.detach()  # for row counts outside _PACKED_ROWS
        self.bias = None if bias is None else bias.detach()
        self.weight = None
        if weight.numel() >= _PACKED_MIN_WEIGHTS:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.plain_weight, _LAYOUT_ROWS)

    def _packed(self, x: Tensor) -> bool:
        return self.weight is not None and x.shape[0] in _PACKED_ROWS

    def __call__(self, x: Tensor, act: str = "none") -> Tensor:
        """x W^T + b, then GELU if ``act == "gelu"``."""
        if not self._packed(x):
            y = F.linear(x, self.plain_weight, self.bias)
            return F.gelu(y) if act == "gelu" else y
        # The GELU "algorithm" argument: "none" is the exact erf form, as nn.GELU().
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, act, [], "none" if act == "gelu" else "")

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + (x W^T + b), the addition done on each output tile."""
        if not self._packed(x):
            return residual + F.linear(x, self.plain_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


class _PackedBlock:
    """One `ResidualAttentionBlock`'s linear layers, packed; the LayerNorms and activation are read live."""

    def __init__(self, block: ResidualAttentionBlock, *, last: bool) -> None:
        attn, mlp = block.attn, block.mlp
        D = attn.out_proj.in_features
        self.block, self.heads, self.width = block, attn.heads, D
        w, b = attn.in_proj_weight, attn.in_proj_bias
        if last:  # the query for one row, keys and values for all
            self.q, self.kv = _Linear(w[:D], b[:D]), _Linear(w[D:], b[D:])
        else:
            self.qkv = _Linear(w, b)
        self.out = _Linear(attn.out_proj.weight, attn.out_proj.bias)
        self.fc = _Linear(mlp.c_fc.weight, mlp.c_fc.bias)
        self.proj = _Linear(mlp.c_proj.weight, mlp.c_proj.bias)
        # oneDNN fuses the exact (erf) GELU only; its swish ignores a scale, so QuickGELU (or any
        # other activation) runs as the module itself does, after the packed multiply.
        self.fused_gelu = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"

    def _ln(self, ln: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def _mlp(self, y: Tensor) -> Tensor:
        """y + mlp(ln_2(y)) for y [M, D]."""
        h = self._ln(self.block.ln_2, y)
        h = self.fc(h, "gelu") if self.fused_gelu else self.block.mlp.act(self.fc(h))
        return self.proj.add(h, y)

    def forward(self, x: Tensor, B: int, L: int, causal: bool) -> Tensor:
        """`ResidualAttentionBlock.forward` on x [B*L, D] (rows of each sequence together)."""
        H, D = self.heads, self.width
        h = self._ln(self.block.ln_1, x)
        if hasattr(self, "qkv"):
            qkv = self.qkv(h)  # [B*L, 3D]
        else:  # a last block, packed for one query row, run on every row (Transformer.forward)
            qkv = torch.cat([self.q(h), self.kv(h)], dim=1)  # [B*L, 3D]
        q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, D/H]
        y = y.transpose(1, 2).reshape(B * L, D)  # [B*L, D]
        return self._mlp(self.out.add(y, x))

    def forward_query(self, x: Tensor, B: int, L: int, index: Tensor, causal: bool) -> Tensor:
        """`ResidualAttentionBlock.forward_query` on x [B*L, D]: [B, D]."""
        H, D = self.heads, self.width
        rows = torch.arange(B, device=x.device) * L + index  # each query's row in x
        h = self._ln(self.block.ln_1, x)
        q = self.q(h[rows]).view(B, H, 1, D // H)  # [B, H, 1, D/H]
        k, v = self.kv(h).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x [B, H, L, D/H]
        mask = None
        if causal:
            mask = (torch.arange(L, device=x.device)[None, :] <= index[:, None]).view(B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, 1, D/H]
        return self._mlp(self.out.add(y.reshape(B, D), x[rows]))  # [B, D]


class PackedTransformer(_Packed):
    """`Transformer.forward_pooled` through packed linear layers."""

    def __init__(self, transformer: Transformer) -> None:
        self.transformer = transformer
        super().__init__(list(transformer.parameters()))

    def _pack(self) -> None:
        *blocks, last = self.transformer.resblocks
        self.blocks = [_PackedBlock(b, last=False) for b in blocks] + [_PackedBlock(last, last=True)]

    def applies(self, x: Tensor) -> bool:
        return applies(x)

    def forward_pooled(self, x: Tensor, index: Tensor, *, causal: bool) -> Tensor:
        """[B, L, D] -> [B, D], as `Transformer.forward_pooled`."""
        self.refresh()
        B, L, D = x.shape
        x = x.reshape(B * L, D)
        *blocks, last = self.blocks
        for block in blocks:
            x = block.forward(x, B, L, causal)
        return last.forward_query(x, B, L, index, causal)

    def forward(self, x: Tensor, *, causal: bool) -> Tensor:
        """[B, L, D] -> [B, L, D], as `Transformer.forward` (SigLIP's image tower reads every token)."""
        self.refresh()
        B, L, D = x.shape
        x = x.reshape(B * L, D)
        for block in self.blocks:
            x = block.forward(x, B, L, causal)
        return x.view(B, L, D)


class PackedPatchEmbedding(_Packed):
    """The ViT's patch convolution (stride = kernel; OpenAI's without bias, SigLIP's with) as one matrix multiply."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        super().__init__([p for p in (conv.weight, conv.bias) if p is not None])

    def _pack(self) -> None:
        w = self.conv.weight  # [D, 3, P, P]
        self.linear = _Linear(w.reshape(w.shape[0], -1), self.conv.bias)

    def applies(self, images: Tensor) -> bool:
        return applies(images)

    def __call__(self, images: Tensor) -> Tensor:
        """Images [B, 3, S, S] -> patch features [B, (S/P)^2, D], as conv1 + flatten + transpose."""
        self.refresh()
        B, C, S, _ = images.shape
        P = self.conv.kernel_size[0]
        g = S // P
        images = images[:, :, : g * P, : g * P]  # what the convolution sees: a remainder of S / P is dropped
        patches = images.reshape(B, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5)  # [B, g, g, C, P, P]
        x = self.linear(patches.reshape(B * g * g, C * P * P))  # [B*g*g, D]
        return x.view(B, g * g, -1)


def install(tower: nn.Module, *, enable: bool = True) -> None:
    """Fills a tower's hooks with packed copies of its weights, or empties them (``enable=False``).

    The text towers and the ViTs (CLIP's and SigLIP's) hold a `Transformer` (``_packed``); a ViT
    also its patch convolution (``_packed_patches``).  A ResNet image tower has no hook and is
    left as it is; so is SigLIP's attention-pooling head (one query row: nothing to gain).
    """
    if isinstance(tower, (VisionTransformer, SigLipVisionTransformer)):
        tower._packed_patches = PackedPatchEmbedding(tower.conv1) if enable else None
    if isinstance(tower, (VisionTransformer, SigLipVisionTransformer, TextTransformer, SigLipTextTransformer)):
        tower.transformer._packed = PackedTransformer(tower.transformer) if enable else None
