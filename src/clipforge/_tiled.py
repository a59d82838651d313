"""Tiled autograd functions behind :func:`clipforge.clip_loss` and
:func:`clipforge.siglip_loss` with ``chunk_size`` set.

They hold at most one (chunk × chunk) tile of the N×N logits at a time.  Forward keeps
O(N) numbers (the row and column log-sum-exps); backward recomputes each tile and
accumulates the feature gradients, so a CLIP loss costs 8·N²·d FLOPs (the logits twice,
two gradient products) in O(N·d + chunk²) memory.  docs/loss.md §Tiles walks through it.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from clipforge.distributed import Comm


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32



# --------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------

# Column log-sum-exps are accumulated from row-shifted exponentials (one exp per element);
# a column whose partial sum falls below this is recomputed with its own maximum, so no
# precision is lost to underflow.  exp(-57) ≈ 1.8e-25, far above float32's 1.2e-38.
_UNDERFLOW = 1e-25


def auto_chunk_size(n: int, d: int, *, device: torch.device | str = "cpu", budget: int | None = None) -> int:
    """Tile edge for the tiled losses: the largest power of two (≤ 2048) whose few
    tile-sized buffers — at most 4 float32 tiles at a time — fit in ``budget`` bytes
    (default: min(64 MiB, 5 % of free memory)), and no larger than N.

    2048 is where this machine's matmuls reach full speed for d = 512 (see
    docs/benchmarks.md); larger tiles only cost memory."""
    if budget is None:
        free = _free_memory(torch.device(device))
        budget = min(64 << 20, int(0.05 * free)) if free else 64 << 20
    edge = 2048
    while edge > 128 and 4 * 4 * edge * edge > budget:
        edge //= 2
    return max(1, min(n, edge))


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class _TileBuffers:
    """Reusable (chunk × chunk) buffers.  Allocating a fresh tile per step would make the
    allocator map and fault in new pages every time; views of one flat buffer avoid it."""

    def __init__(self, count: int, chunk: int, like: Tensor) -> None:
        self.flat = [like.new_empty(chunk * chunk) for _ in range(count)]

    def get(self, k: int, rows: int, cols: int) -> Tensor:
        return self.flat[k][: rows * cols].view(rows, cols)


def _logits(out: Tensor, xi: Tensor, yj: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """out ← scale · xi yjᵀ (+ bias), with the scale applied inside the matmul (BLAS alpha)."""
    if bias is None:
        return torch.addmm(out, xi, yj.T, beta=0, alpha=scale, out=out)
    return torch.addmm(bias, xi, yj.T, alpha=scale, out=out)


def _clip_lse_tiles(x: Tensor, y: Tensor, scale: float, chunk: int) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of ``L = s · x yᵀ`` without materialising L.

    x: (n, d) rows, y: (m, d) columns.  Returns r (n,) and c (m,).  Each tile costs one
    exp per element: rows are shifted by their own max, and the tile's column sums reuse
    those exponentials reweighted by ``w_i = exp(rowmax_i − tilemax)`` (a matrix–vector
    product).  A column whose reweighted sum falls below ``_UNDERFLOW`` (its entries all
    far below the tile's maximum) is recomputed with its own maximum.
    """
    n, m = x.shape[0], y.shape[0]
    r = x.new_empty(n)
    c = x.new_full((m,), -math.inf)
    buf = _TileBuffers(1, chunk, x)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        run_max = x.new_full((xi.shape[0],), -math.inf)
        run_sum = x.new_zeros(xi.shape[0])
        for j0 in range(0, m, chunk):
            yj = y[j0 : j0 + chunk]
            tile = _logits(buf.get(0, xi.shape[0], yj.shape[0]), xi, yj, scale)  # (bi, bj)
            row_max = tile.amax(dim=1)  # (bi,)
            tile.sub_(row_max[:, None]).exp_()  # exp(L − rowmax)
            # rows: online log-sum-exp across column tiles
            new_max = torch.maximum(run_max, row_max)
            run_sum.mul_(torch.exp(run_max - new_max)).add_(tile.sum(dim=1) * torch.exp(row_max - new_max))
            run_max = new_max
            # columns: Σ_i exp(L_ij − M) = Σ_i w_i exp(L_ij − rowmax_i)
            top = row_max.max()
            col_sum = torch.mv(tile.T, torch.exp(row_max - top))  # (bj,)
            low = col_sum < _UNDERFLOW
            tile_lse = col_sum.log_().add_(top)
            if bool(low.any()):
                idx = low.nonzero().squeeze(1)
                tile_lse[idx] = torch.logsumexp(scale * (xi @ yj[idx].T), dim=0)
            cj = c[j0 : j0 + chunk]
            torch.logaddexp(cj, tile_lse, out=cj)
        r[i0 : i0 + chunk] = run_max + run_sum.log()
    return r, c


def _clip_grad_tiles(
    x: Tensor, y: Tensor, scale: float, r: Tensor, c: Tensor, chunk: int, mm_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """With ``G = exp(L − r) + exp(L − c)`` (softmax over captions plus softmax over
    images), tile by tile: returns (G y, Gᵀ x).  The products with G run in ``mm_dtype``
    — bf16/fp16 when the features were: their gradients are rounded to it anyway."""
    n, m = x.shape[0], y.shape[0]
    gx = x.new_zeros(n, y.shape[1])
    gy = x.new_zeros(m, x.shape[1])
    x_mm, y_mm = (x.to(mm_dtype), y.to(mm_dtype)) if mm_dtype != x.dtype else (x, y)
    buf = _TileBuffers(2, chunk, x)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        ri = r[i0 : i0 + chunk, None]
        for j0 in range(0, m, chunk):
            yj = y[j0 : j0 + chunk]
            bi, bj = xi.shape[0], yj.shape[0]
            tile = _logits(buf.get(0, bi, bj), xi, yj, scale)  # (bi, bj) logits, recomputed
            g = torch.sub(tile, ri, out=buf.get(1, bi, bj)).exp_()  # softmax over captions
            g.add_(tile.sub_(c[None, j0 : j0 + chunk]).exp_())  # + softmax over images
            _accumulate(g, gx[i0 : i0 + chunk], gy[j0 : j0 + chunk], x_mm[i0 : i0 + chunk], y_mm[j0 : j0 + chunk])
    return gx, gy


def _accumulate(g: Tensor, gx: Tensor, gy: Tensor, xi: Tensor, yj: Tensor) -> None:
    """gx += G yj and gy += Gᵀ xi for one tile; in place when G and the features share a
    dtype, else (bf16/fp16 features) G is cast to theirs and the products added in fp32."""
    if g.dtype == xi.dtype:
        gx.addmm_(g, yj)
        gy.addmm_(g.T, xi)
    else:
        g = g.to(xi.dtype)
        gx += g @ yj
        gy += g.T @ xi


def _siglip_fwd_tiles(x: Tensor, y: Tensor, scale: float, bias: Tensor, chunk: int) -> Tensor:
    """Σ_ij log σ(−(s · x_i·y_j + b)) over all pairs, tile by tile."""
    total = x.new_zeros(())
    buf = _TileBuffers(1, chunk, x)
    for i0 in range(0, x.shape[0], chunk):
        xi = x[i0 : i0 + chunk]
        for j0 in range(0, y.shape[0], chunk):
            yj = y[j0 : j0 + chunk]
            tile = _logits(buf.get(0, xi.shape[0], yj.shape[0]), xi, yj, scale, bias)  # L + b
            total += F.logsigmoid(tile.neg_()).sum()
    return total


def _siglip_grad_tiles(
    x: Tensor, y: Tensor, scale: float, bias: Tensor, chunk: int, mm_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """With ``G = σ(L + b)``, tile by tile: returns (G y, Gᵀ x, Σ G)."""
    n, m = x.shape[0], y.shape[0]
    gx = x.new_zeros(n, y.shape[1])
    gy = x.new_zeros(m, x.shape[1])
    gsum = x.new_zeros(())
    x_mm, y_mm = (x.to(mm_dtype), y.to(mm_dtype)) if mm_dtype != x.dtype else (x, y)
    buf = _TileBuffers(1, chunk, x)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        for j0 in range(0, m, chunk):
            yj = y[j0 : j0 + chunk]
            g = _logits(buf.get(0, xi.shape[0], yj.shape[0]), xi, yj, scale, bias).sigmoid_()
            gsum += g.sum()
            _accumulate(g, gx[i0 : i0 + chunk], gy[j0 : j0 + chunk], x_mm[i0 : i0 + chunk], y_mm[j0 : j0 + chunk])
    return gx, gy, gsum


# --------------------------------------------------------------------------------------
# Targets in O(N·d): per-group sums of features
# --------------------------------------------------------------------------------------


class _Groups:
    """Group structure of the global batch: ``inverse[k]`` is item k's group index and
    ``counts[g]`` the size of group g.  ``labels=None`` means every item is alone."""

    def __init__(self, labels: Tensor | None) -> None:
        self.inverse: Tensor | None = None
        self.counts: Tensor | None = None
        if labels is not None:
            _, self.inverse, self.counts = torch.unique(labels, return_inverse=True, return_counts=True)

    def n_positives(self, rows: slice | None, b: int) -> float:
        """Σ over our rows of their group sizes: the number of positive pairs in the block."""
        if self.inverse is None:
            return float(b)
        inv = self.inverse if rows is None else self.inverse[rows]
        return float(self.counts[inv].sum())


def _group_sums(groups: _Groups, feats: Tensor, *, rows: slice | None, n_global: int, mean: bool = False) -> Tensor:
    """``P F`` for the 0/1 positives matrix P (or ``Y F`` for the row-normalised Y with
    ``mean=True``): row k is the sum (mean) of F over k's group, where F holds ``feats``
    at positions ``rows`` of the global batch and zeros elsewhere (all of it if ``rows``
    is None).  Returns (N, d); may return ``feats`` itself."""
    if groups.inverse is None:
        if rows is None:
            return feats
        out = feats.new_zeros(n_global, feats.shape[1])
        out[rows] = feats
        return out
    inv = groups.inverse if rows is None else groups.inverse[rows]
    sums = feats.new_zeros(groups.counts.shape[0], feats.shape[1])
    sums.index_add_(0, inv, feats)
    if mean:
        sums /= groups.counts[:, None].to(feats.dtype)
    return sums[groups.inverse]


def _smoothed_targets_times(
    groups: _Groups, feats: Tensor, eps: float, *, rows: slice | None, n_global: int
) -> Tensor:
    """``Ỹ F`` for Ỹ = (1−ε) Y + ε/N, F as in :func:`_group_sums`: row k is (1−ε) · the
    mean of F over k's group + ε/N · Σ F.  Returns (N, d); may return ``feats`` itself."""
    out = _group_sums(groups, feats, rows=rows, n_global=n_global, mean=True)
    if eps:
        out = out * (1 - eps) + feats.sum(dim=0, keepdim=True) * (eps / n_global)
    return out


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a ⊙ b without an (n, d) temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


# --------------------------------------------------------------------------------------
# Tiled autograd functions
# --------------------------------------------------------------------------------------


class _RowBlock:
    """What forward and backward share: this process's image rows ``x`` (B, d) against
    the global captions ``y`` (N, d), in the compute dtype.  Single process: B = N and
    ``rows`` is None.  Distributed: captions and labels are all-gathered in rank order and
    ``rows`` is where our rows sit in the global batch."""

    def __init__(
        self, img: Tensor, txt: Tensor, labels: Tensor | None, comm: Comm | None,
        gathered: tuple[Tensor, Tensor | None, int] | None = None,
    ) -> None:
        dtype = _compute_dtype(img)
        self.x = img.detach().to(dtype)
        if comm is None:
            self.y, self.labels, self.rows, self.world = txt.detach().to(dtype), labels, None, 1
        else:
            if gathered is None:  # forward: gather; backward reuses what forward gathered
                t_all, offset = comm.all_gather_rows(txt.detach().to(dtype))
                labels_all = None if labels is None else comm.all_gather_rows(labels)[0]
                gathered = (t_all, labels_all, offset)
            self.y, self.labels, offset = gathered
            self.rows, self.world = slice(offset, offset + self.x.shape[0]), comm.world_size
        self.n = self.y.shape[0]
        self.groups = _Groups(self.labels)

    def saved(self) -> tuple[Tensor, Tensor | None, int] | None:
        """What backward needs to rebuild the block without communicating again."""
        return None if self.rows is None else (self.y, self.labels, self.rows.start)

    def ours(self, t: Tensor) -> Tensor:
        """Our rows of a global (N, ...) tensor."""
        return t if self.rows is None else t[self.rows]


def _refuse_double_backward(loss: str) -> None:
    """The backward below recomputes tiles from detached features, so the gradients it returns
    carry no graph: a second derivative taken through them would be missing or silently zero.
    Autograd enables grad mode inside a backward only for ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the tiled {loss} has no double backward (create_graph=True): its backward recomputes "
            f"the logits tile by tile outside autograd. Pass chunk_size=None for the plain formula, "
            f"which supports higher-order gradients."
        )


class _TiledClipLoss(torch.autograd.Function):
    """CLIP loss over a row block: this process's images against the global captions.

    Forward: r (our rows) and c (all captions, combined across ranks with a log-sum-exp
    all-reduce), then ``loss = (Σ r + Σ c) / 2N − s Σ ⟨I_i, (Ỹ T)_i⟩ / N`` summed over ranks.
    Backward: ``dLoss/dL = (P_row + P_col)/2N − Ỹ/N``, so ``dI = s (dLoss/dL) T``,
    ``dT = s (dLoss/dL)ᵀ I`` (all-reduced: every rank contributes its rows) and
    ``ds = Σ ⟨dI_i, I_i⟩ / s``.  With W ranks, gradients are multiplied by W so that
    averaging over ranks (what DDP does) gives exactly the global loss's gradient.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, labels, eps, chunk, comm):  # type: ignore[override]
        blk = _RowBlock(img, txt, labels, comm)
        s = float(scale.detach())
        r, c = _clip_lse_tiles(blk.x, blk.y, s, chunk)
        if comm is not None:
            c = comm.all_logsumexp(c)
        y_t = blk.ours(_smoothed_targets_times(blk.groups, blk.y, eps, rows=None, n_global=blk.n))  # (B, d)
        local = (r.sum() + blk.ours(c).sum()) / (2 * blk.n) - s * _dot(blk.x, y_t) / blk.n
        loss = local if comm is None else comm.all_reduce_sum(local)

        ctx.save_for_backward(img, txt, scale, r, c)
        ctx.eps, ctx.chunk, ctx.comm, ctx.labels, ctx.gathered = eps, chunk, comm, labels, blk.saved()
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        _refuse_double_backward("clip_loss")
        img, txt, scale, r, c = ctx.saved_tensors
        comm, eps = ctx.comm, ctx.eps
        blk = _RowBlock(img, txt, ctx.labels, comm, ctx.gathered)
        s, g = float(scale.detach()), float(grad_out)
        mm_dtype = img.dtype if img.dtype in (torch.bfloat16, torch.float16) else blk.x.dtype

        gx, gy = _clip_grad_tiles(blk.x, blk.y, s, r, c, ctx.chunk, mm_dtype)
        y_t = blk.ours(_smoothed_targets_times(blk.groups, blk.y, eps, rows=None, n_global=blk.n))  # (B, d)
        x_t = _smoothed_targets_times(blk.groups, blk.x, eps, rows=blk.rows, n_global=blk.n)  # (N, d) = Ỹ[:, rows] I
        d_img = gx.mul_(1 / (2 * blk.n)).sub_(y_t, alpha=1 / blk.n).mul_(s * g)
        d_txt = gy.mul_(1 / (2 * blk.n)).sub_(x_t, alpha=1 / blk.n).mul_(s * g)
        d_scale = _dot(d_img, blk.x) / s  # Σ_ij (dLoss/dL_ij) ⟨I_i, T_j⟩, our rows
        if comm is not None:
            d_txt = blk.ours(comm.all_reduce_sum(d_txt))
        return _grads_out(ctx, blk.world, (img, d_img), (txt, d_txt), (scale, d_scale)) + (None,) * 4


class _TiledSigLipLoss(torch.autograd.Function):
    """SigLIP loss over a row block (distributed contract as in :class:`_TiledClipLoss`).

    ``loss = −(Σ_ij log σ(−x_ij) + Σ_ij P_ij x_ij) / N`` with ``x = s I Tᵀ + b``; the
    positives' sum is ``s Σ_i ⟨I_i, (P T)_i⟩ + b · #positives``.  ``dLoss/dx = (σ(x) − P)/N``.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, bias, labels, chunk, comm):  # type: ignore[override]
        blk = _RowBlock(img, txt, labels, comm)
        s, b = float(scale.detach()), bias.detach().to(blk.x.dtype).reshape(())
        pos_t = blk.ours(_group_sums(blk.groups, blk.y, rows=None, n_global=blk.n))  # (B, d)
        n_pos = blk.groups.n_positives(blk.rows, blk.x.shape[0])
        total = _siglip_fwd_tiles(blk.x, blk.y, s, b, chunk) + s * _dot(blk.x, pos_t) + b * n_pos
        local = -total / blk.n
        loss = local if comm is None else comm.all_reduce_sum(local)

        ctx.save_for_backward(img, txt, scale, bias)
        ctx.chunk, ctx.comm, ctx.labels, ctx.gathered = chunk, comm, labels, blk.saved()
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        _refuse_double_backward("siglip_loss")
        img, txt, scale, bias = ctx.saved_tensors
        comm = ctx.comm
        blk = _RowBlock(img, txt, ctx.labels, comm, ctx.gathered)
        s, g = float(scale.detach()), float(grad_out)
        b = bias.detach().to(blk.x.dtype).reshape(())
        mm_dtype = img.dtype if img.dtype in (torch.bfloat16, torch.float16) else blk.x.dtype

        gx, gy, gsum = _siglip_grad_tiles(blk.x, blk.y, s, b, ctx.chunk, mm_dtype)
        pos_t = blk.ours(_group_sums(blk.groups, blk.y, rows=None, n_global=blk.n))  # (B, d)
        pos_x = _group_sums(blk.groups, blk.x, rows=blk.rows, n_global=blk.n)  # (N, d)
        n_pos = blk.groups.n_positives(blk.rows, blk.x.shape[0])
        d_img = gx.sub_(pos_t).mul_(s * g / blk.n)
        d_txt = gy.sub_(pos_x).mul_(s * g / blk.n)
        d_scale = _dot(d_img, blk.x) / s
        d_bias = (gsum - n_pos) * (g / blk.n)
        if comm is not None:
            d_txt = blk.ours(comm.all_reduce_sum(d_txt))
        return _grads_out(ctx, blk.world, (img, d_img), (txt, d_txt), (scale, d_scale), (bias, d_bias)) + (None,) * 3


def _grads_out(ctx, world: int, *pairs: tuple[Tensor, Tensor]) -> tuple[Tensor | None, ...]:
    """Cast each gradient to its input's dtype and shape; × W for DDP's averaging."""
    out = []
    for k, (inp, grad) in enumerate(pairs):
        if not ctx.needs_input_grad[k]:
            out.append(None)
            continue
        if world > 1:
            grad = grad * world
        out.append(grad.to(inp.dtype).reshape(inp.shape))
    return tuple(out)
