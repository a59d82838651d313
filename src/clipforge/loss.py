"""Contrastive losses of CLIP and SigLIP, exact and memory-efficient.

Notation (docs/loss.md derives every line):

* ``I`` (N, d) image features, ``T`` (N, d) text features, used as given — callers
  normalise them (the model's ``forward`` returns normalised features).
* ``s`` the logit scale (the inverse temperature, already exponentiated, as OpenCLIP and
  Hugging Face pass it) and, for SigLIP, ``b`` the logit bias.
* ``L = s · I Tᵀ`` the N×N logits; row i holds image i against every caption.
* ``Y`` the target matrix: ``Y_ij = [g_i = g_j] / #{k : g_k = g_i}`` for group ids ``g``
  (``labels``); by default ``g = arange(N)`` and ``Y`` is the identity. ``Y`` is symmetric,
  so the same targets serve both directions.  Label smoothing ε gives
  ``Ỹ = (1 - ε) Y + ε / N`` (as ``F.cross_entropy(label_smoothing=ε)`` does).

CLIP loss: ``½ (CE(L, Ỹ) + CE(Lᵀ, Ỹ))``, i.e. with row and column log-sum-exps ``r_i`` and ``c_j``::

    loss = (Σ_i r_i + Σ_j c_j) / 2N  −  Σ_ij Ỹ_ij L_ij / N

SigLIP loss: with ``x = L + b`` and positives ``P_ij = [g_i = g_j]``, using
``log σ(x) − log σ(−x) = x``::

    loss = −(Σ_ij log σ(−x_ij) + Σ_ij P_ij x_ij) / N

Only the log-sum-exps (CLIP) and ``Σ log σ(−x)`` (SigLIP) need the N×N matrix; the target
terms reduce to per-group feature sums in O(N·d).  ``chunk_size=None`` evaluates the plain
formula (the readable reference); an integer or ``"auto"`` runs the tiled autograd functions,
which hold one tile of the matrix at a time in forward and backward and give the same result
to floating-point rounding.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from clipforge.distributed import Comm

__all__ = [
    "LogitScale",
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "siglip_loss",
    "auto_chunk_size",
]

ChunkSize = Union[int, Literal["auto"], None]
Distributed = Union[bool, Literal["auto"], "Comm"]

# CLIP (Radford et al. 2021, §2.5): "The learnable temperature parameter τ was initialized
# to the equivalent of 0.07 from (Wu et al., 2018) and clipped to prevent scaling the
# logits by more than 100 which we found necessary to prevent training instability."
CLIP_INIT_SCALE = 1 / 0.07
MAX_SCALE = 100.0
# SigLIP (Zhai et al. 2023, §3.2 and Fig. 1's pseudo-code): t' = log 10, b = −10, so that
# the N² − N negatives do not dominate the first steps.
SIGLIP_INIT_SCALE = 10.0
SIGLIP_INIT_BIAS = -10.0


# --------------------------------------------------------------------------------------
# Temperature
# --------------------------------------------------------------------------------------


class LogitScale(nn.Module):
    """The learnable logit scale ``s = exp(log_scale)`` (and, for SigLIP, a bias).

    The parameter is stored as log s so that the optimiser works on a scale-free quantity
    and s stays positive.  ``forward()`` returns s clamped at ``max_scale`` (100, as in
    CLIP §2.5: larger scales made training unstable).  The clamp acts on the value only;
    call :meth:`clamp_` after each optimiser step (as OpenCLIP does) to keep the stored
    parameter inside the range too, so its gradient never vanishes above the cap.
    """

    def __init__(
        self,
        init_scale: float = CLIP_INIT_SCALE,
        *,
        init_bias: float | None = None,
        max_scale: float = MAX_SCALE,
    ) -> None:
        super().__init__()
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not (max_scale > 0):
            raise ValueError(f"max_scale must be positive, got {max_scale!r}")
        self.max_scale = float(max_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = None if init_bias is None else nn.Parameter(torch.tensor(float(init_bias)))

    @classmethod
    def clip(cls) -> "LogitScale":
        """CLIP's initialisation: s = 1/0.07, no bias."""
        return cls(CLIP_INIT_SCALE)

    @classmethod
    def siglip(cls) -> "LogitScale":
        """SigLIP's initialisation: s = 10, b = −10."""
        return cls(SIGLIP_INIT_SCALE, init_bias=SIGLIP_INIT_BIAS)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(self.max_scale)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the stored log-scale to [0, log max_scale] in place."""
        self.log_scale.clamp_(0.0, math.log(self.max_scale))

    def extra_repr(self) -> str:
        s = math.exp(float(self.log_scale))
        b = "" if self.bias is None else f", bias={float(self.bias):.4g}"
        return f"scale={s:.4g}{b}, max_scale={self.max_scale:g}"


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_inputs(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor | None,
    chunk_size: ChunkSize,
    logit_bias: Tensor | float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Validate and return (scale, bias) as tensors on the features' device."""
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (N, d), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must have the same shape (N, d), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    n, d = image_features.shape
    if n == 0 or d == 0:
        raise ValueError(f"empty batch: features have shape {tuple(image_features.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features is on {image_features.device} but text_features on {text_features.device}"
        )
    for name, x in (("image_features", image_features), ("text_features", text_features)):
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise ValueError(f"{name} has non-finite values (NaN or Inf) in {bad} of {n} rows")
    scale = _as_scalar_tensor(logit_scale, "logit_scale", image_features.device)
    s = float(scale.detach())
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"logit_scale must be positive and finite, got {s!r}")
    bias = None
    if logit_bias is not None:
        bias = _as_scalar_tensor(logit_bias, "logit_bias", image_features.device)
        if not math.isfinite(float(bias.detach())):
            raise ValueError(f"logit_bias must be finite, got {float(bias.detach())!r}")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise ValueError(f"labels must be a torch.Tensor of shape ({n},), got {type(labels).__name__}")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the {n} features, got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if chunk_size is not None and chunk_size != "auto":
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be None, 'auto' or a positive int, got {chunk_size!r}")
    return scale, bias


def _as_scalar_tensor(value: Tensor | float, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features on {device}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device)
    raise ValueError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _resolve_comm(distributed: Distributed) -> "Comm | None":
    if distributed is False or distributed is None:
        return None
    from clipforge import distributed as dist_mod

    if distributed is True:
        comm = dist_mod.Comm.from_default_group()
        if comm is None:
            raise ValueError("distributed=True but torch.distributed is not initialised")
        return comm if comm.world_size > 1 else None
    if distributed == "auto":
        comm = dist_mod.Comm.from_default_group()
        return comm if comm is not None and comm.world_size > 1 else None
    if isinstance(distributed, dist_mod.Comm):
        return distributed if distributed.world_size > 1 else None
    raise ValueError(f"distributed must be True, False, 'auto' or a Comm, got {distributed!r}")


# --------------------------------------------------------------------------------------
# The plain formulas (chunk_size=None): the readable reference
# --------------------------------------------------------------------------------------


def _targets(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Y_ij = [g_i = g_j] / #group(i): a row-stochastic, symmetric (N, N) matrix."""
    same = (labels[:, None] == labels[None, :]).to(dtype)  # (N, N)
    return same / same.sum(dim=1, keepdim=True)


def _clip_loss_naive(img: Tensor, txt: Tensor, scale: Tensor, labels: Tensor | None, eps: float) -> Tensor:
    dtype = _compute_dtype(img)
    logits = scale.to(dtype) * img.to(dtype) @ txt.to(dtype).T  # (N, N): image i vs caption j
    if labels is None:
        target = torch.arange(img.shape[0], device=img.device)
    else:
        target = _targets(labels, dtype)  # symmetric: serves both directions
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=eps)
        + F.cross_entropy(logits.T, target, label_smoothing=eps)
    )


def _siglip_loss_naive(img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None) -> Tensor:
    dtype = _compute_dtype(img)
    logits = scale.to(dtype) * img.to(dtype) @ txt.to(dtype).T + bias.to(dtype)  # (N, N)
    if labels is None:
        pos = torch.eye(img.shape[0], device=img.device, dtype=torch.bool)
    else:
        pos = labels[:, None] == labels[None, :]
    sign = pos.to(dtype) * 2 - 1  # +1 for positives, −1 for negatives
    return -F.logsigmoid(sign * logits).sum() / img.shape[0]


# --------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------

# Column log-sum-exps are accumulated from row-shifted exponentials (one exp per element);
# a column whose partial sum falls below this is recomputed with its own maximum, so no
# precision is lost to underflow.  exp(-57) ≈ 1.8e-25, far above float32's 1.2e-38.
_UNDERFLOW = 1e-25


def auto_chunk_size(n: int, d: int, *, device: torch.device | str = "cpu", budget: int | None = None) -> int:
    """Tile edge for the tiled losses: big enough for efficient matmuls, small enough that
    the few tile-sized buffers (about 4 at a time) stay within ``budget`` bytes (default:
    min(256 MiB, 5 % of free memory))."""
    if budget is None:
        free = _free_memory(torch.device(device))
        budget = min(256 << 20, int(0.05 * free)) if free else 256 << 20
    edge = 4096
    while edge > 256 and 4 * 4 * edge * edge > budget:
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


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ bᵀ in the compute dtype.  Both are float32/float64 here; bf16/fp16 inputs are
    upcast once before tiling because the logits must be exact to float32 rounding (a
    bf16 matmul rounds its output to 8 bits of mantissa)."""
    return a @ b.T


def _clip_lse_tiles(x: Tensor, y: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exps of ``L = x yᵀ`` without materialising L.

    x: (n, d) rows, already multiplied by the scale; y: (m, d) columns.
    Returns r (n,) and c (m,).  Each tile costs one exp per element: rows are shifted by
    their own max; a tile's column sums reuse those exponentials, reweighted by
    ``exp(rowmax − tilemax)`` (a matrix–vector product).
    """
    n, m = x.shape[0], y.shape[0]
    r = torch.empty(n, dtype=x.dtype, device=x.device)
    c = torch.full((m,), -math.inf, dtype=x.dtype, device=x.device)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        run_max = torch.full((xi.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
        run_sum = torch.zeros(xi.shape[0], dtype=x.dtype, device=x.device)
        for j0 in range(0, m, chunk):
            yj = y[j0 : j0 + chunk]
            tile = _mm(xi, yj)  # (bi, bj) logits
            row_max = tile.amax(dim=1)  # (bi,)
            tile.sub_(row_max[:, None]).exp_()  # exp(L − rowmax), in place
            # rows: online log-sum-exp across column tiles
            new_max = torch.maximum(run_max, row_max)
            run_sum.mul_(torch.exp(run_max - new_max)).add_(tile.sum(dim=1) * torch.exp(row_max - new_max))
            run_max = new_max
            # columns: Σ_i exp(L_ij − M) = Σ_i w_i exp(L_ij − rowmax_i), w_i = exp(rowmax_i − M)
            top = row_max.max()
            col_sum = torch.exp(row_max - top) @ tile  # (bj,)
            low = col_sum < _UNDERFLOW
            with torch.no_grad():
                tile_lse = col_sum.log_().add_(top)
            if bool(low.any()):
                idx = low.nonzero().squeeze(1)
                tile_lse[idx] = torch.logsumexp(_mm(xi, yj[idx]), dim=0)
            cj = c[j0 : j0 + chunk]
            torch.logaddexp(cj, tile_lse, out=cj)
        r[i0 : i0 + chunk] = run_max + run_sum.log()
    return r, c


def _clip_grad_tiles(
    x: Tensor, y: Tensor, r: Tensor, c: Tensor, chunk: int, mm_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``G = exp(L − r) + exp(L − c)`` tile by tile; returns (G y, Gᵀ x) with x, y as in
    :func:`_clip_lse_tiles` (x scaled).  The two matmuls with G run in ``mm_dtype``
    (bf16/fp16 when the inputs were: their gradients are rounded to that dtype anyway)."""
    n, m = x.shape[0], y.shape[0]
    gx = torch.zeros(n, y.shape[1], dtype=x.dtype, device=x.device)
    gy = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
    low_x = x if mm_dtype == x.dtype else x.to(mm_dtype)
    low_y = y if mm_dtype == y.dtype else y.to(mm_dtype)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        ri = r[i0 : i0 + chunk, None]
        for j0 in range(0, m, chunk):
            yj = y[j0 : j0 + chunk]
            tile = _mm(xi, yj)  # (bi, bj) logits, recomputed
            p_row = torch.sub(tile, ri).exp_()  # softmax over captions
            p_col = tile.sub_(c[None, j0 : j0 + chunk]).exp_()  # softmax over images
            g = p_row.add_(p_col)
            if mm_dtype != g.dtype:
                g = g.to(mm_dtype)
            gx[i0 : i0 + chunk] += g @ low_y[j0 : j0 + chunk]
            gy[j0 : j0 + chunk] += g.T @ low_x[i0 : i0 + chunk]
    return gx, gy


def _siglip_fwd_tiles(x: Tensor, y: Tensor, bias: Tensor, chunk: int) -> Tensor:
    """Σ_ij log σ(−(x_i·y_j + b)) over all pairs, tile by tile."""
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    for i0 in range(0, x.shape[0], chunk):
        xi = x[i0 : i0 + chunk]
        for j0 in range(0, y.shape[0], chunk):
            tile = torch.addmm(bias, xi, y[j0 : j0 + chunk].T)  # (bi, bj) = L + b
            total += F.logsigmoid(tile.neg_()).sum()
    return total


def _siglip_grad_tiles(
    x: Tensor, y: Tensor, bias: Tensor, chunk: int, mm_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``G = σ(L + b)`` tile by tile; returns (G y, Gᵀ x, Σ G)."""
    n, m = x.shape[0], y.shape[0]
    gx = torch.zeros(n, y.shape[1], dtype=x.dtype, device=x.device)
    gy = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
    gsum = torch.zeros((), dtype=x.dtype, device=x.device)
    low_x = x if mm_dtype == x.dtype else x.to(mm_dtype)
    low_y = y if mm_dtype == y.dtype else y.to(mm_dtype)
    for i0 in range(0, n, chunk):
        xi = x[i0 : i0 + chunk]
        for j0 in range(0, m, chunk):
            g = torch.addmm(bias, xi, y[j0 : j0 + chunk].T).sigmoid_()  # (bi, bj)
            gsum += g.sum()
            if mm_dtype != g.dtype:
                g = g.to(mm_dtype)
            gx[i0 : i0 + chunk] += g @ low_y[j0 : j0 + chunk]
            gy[j0 : j0 + chunk] += g.T @ low_x[i0 : i0 + chunk]
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

    def sizes(self, dtype: torch.dtype) -> Tensor | None:
        """(N,) group size of each item, or None when all are 1."""
        return None if self.inverse is None else self.counts[self.inverse].to(dtype)


def _group_sums(groups: _Groups, feats: Tensor, *, rows: slice | None = None, n_global: int = 0) -> Tensor:
    """``P F`` for the 0/1 positives matrix P: row k is Σ of F over k's group, where F holds
    ``feats`` at positions ``rows`` of the global batch and zeros elsewhere (all of it if
    ``rows`` is None).  Returns (N, d)."""
    if groups.inverse is None:
        if rows is None:
            return feats
        out = feats.new_zeros(n_global, feats.shape[1])
        out[rows] = feats
        return out
    inv = groups.inverse if rows is None else groups.inverse[rows]
    sums = feats.new_zeros(groups.counts.shape[0], feats.shape[1])
    sums.index_add_(0, inv, feats)
    return sums[groups.inverse]


def _smoothed_target_times(
    groups: _Groups, feats: Tensor, eps: float, n_global: int, *, rows: slice | None = None
) -> Tensor:
    """``Ỹ F`` for the targets Ỹ = (1−ε) Y + ε/N (F as in :func:`_group_sums`): row k is
    (1−ε) · the mean of F over k's group + ε/N · Σ F.  Returns (N, d)."""
    out = _group_sums(groups, feats, rows=rows, n_global=n_global)
    sizes = groups.sizes(feats.dtype)
    if sizes is not None:
        out = out / sizes[:, None]
    out = out * (1 - eps)
    if eps:
        out = out + feats.sum(dim=0, keepdim=True) * (eps / n_global)
    return out


# --------------------------------------------------------------------------------------
# Tiled autograd functions
# --------------------------------------------------------------------------------------


class _TiledClipLoss(torch.autograd.Function):
    """CLIP loss over a row block: this process's images against the global captions.

    Single process: the block is the whole batch.  Distributed (``comm``): each rank holds
    B local rows; captions are all-gathered, column log-sum-exps are combined across ranks,
    and the backward all-reduces the captions' gradient.  Gradients are multiplied by the
    world size W so that averaging over ranks (what DDP does) yields exactly the gradient
    of the global loss; the value returned on every rank is the global loss.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, labels, eps, chunk, comm):  # type: ignore[override]
        dtype = _compute_dtype(img)
        x = img.detach().to(dtype)
        t_local = txt.detach().to(dtype)
        s = scale.detach().to(dtype)
        if comm is None:
            t_all, offset, world, labels_all = t_local, 0, 1, labels
        else:
            t_all, offset = comm.all_gather_rows(t_local)
            world = comm.world_size
            labels_all = None if labels is None else comm.all_gather_rows(labels)[0]
        n_global, b = t_all.shape[0], x.shape[0]
        rows = slice(offset, offset + b)
        xs = x * s  # scale folded into the rows: L = (s·I) Tᵀ

        r, c = _clip_lse_tiles(xs, t_all, chunk)
        if comm is not None:
            c = comm.all_logsumexp(c)
        groups = _Groups(labels_all)
        # Ỹ T restricted to our rows: (1−ε) · group-mean of captions + ε/N · Σ captions
        y_t = _smoothed_target_times(groups, t_all, eps, n_global)[rows]  # (B, d)
        target_term = (xs * y_t).sum()
        local = (r.sum() + c[rows].sum()) / (2 * n_global) - target_term / n_global
        loss = local if comm is None else comm.all_reduce_sum(local)

        ctx.save_for_backward(img, txt, scale, r, c)
        ctx.labels_all, ctx.eps, ctx.chunk, ctx.comm = labels_all, eps, chunk, comm
        ctx.offset, ctx.world, ctx.t_all = offset, world, t_all if comm is not None else None
        return loss.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        img, txt, scale, r, c = ctx.saved_tensors
        comm, eps, world = ctx.comm, ctx.eps, ctx.world
        dtype = _compute_dtype(img)
        x = img.detach().to(dtype)
        s = scale.detach().to(dtype)
        t_all = txt.detach().to(dtype) if comm is None else ctx.t_all
        n_global, b = t_all.shape[0], x.shape[0]
        rows = slice(ctx.offset, ctx.offset + b)
        mm_dtype = img.dtype if img.dtype in (torch.bfloat16, torch.float16) else dtype
        g = grad_out.to(dtype)

        xs = x * s
        gx, gy = _clip_grad_tiles(xs, t_all, r, c, ctx.chunk, mm_dtype)
        groups = _Groups(ctx.labels_all)
        y_t = _smoothed_target_times(groups, t_all, eps, n_global)[rows]  # (B, d) rows of Ỹ T
        yt_x = _smoothed_target_times(groups, x, eps, n_global, rows=rows)  # (N, d) = Ỹ[rows]ᵀ I
        # dLoss/dL = (P_row + P_col)/2N − Ỹ/N;  dI = s·(dLoss/dL) T,  dT = s·(dLoss/dL)ᵀ I
        # (gy was computed against s·I, so it already carries the factor s)
        d_img = (gx / (2 * n_global) - y_t / n_global) * (s * g)
        d_txt_all = (gy / (2 * n_global) - yt_x * (s / n_global)) * g
        # ds = Σ_ij (dLoss/dL_ij) I_i·T_j = Σ_i ⟨dI_i, I_i⟩ / s  (our rows only)
        d_scale = (d_img * x).sum() / s
        if comm is not None:
            d_txt_all = comm.all_reduce_sum(d_txt_all)
        d_txt = d_txt_all[rows]
        if world > 1:
            d_img, d_txt, d_scale = d_img * world, d_txt * world, d_scale * world
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            d_scale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            None, None, None, None,
        )


class _TiledSigLipLoss(torch.autograd.Function):
    """SigLIP loss over a row block (see :class:`_TiledClipLoss` for the distributed contract)."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, labels, chunk, comm):  # type: ignore[override]
        dtype = _compute_dtype(img)
        x = img.detach().to(dtype)
        t_local = txt.detach().to(dtype)
        s = scale.detach().to(dtype).reshape(())
        bb = bias.detach().to(dtype).reshape(())
        if comm is None:
            t_all, offset, world, labels_all = t_local, 0, 1, labels
        else:
            t_all, offset = comm.all_gather_rows(t_local)
            world = comm.world_size
            labels_all = None if labels is None else comm.all_gather_rows(labels)[0]
        n_global, b = t_all.shape[0], x.shape[0]
        rows = slice(offset, offset + b)
        xs = x * s
        groups = _Groups(labels_all)
        # positives: Σ_{i ours} Σ_{j ~ i} (L_ij + b) = Σ_i ⟨s·I_i, Σ_{j~i} T_j⟩ + b · Σ_i |group(i)|
        pos_t = _group_sums(groups, t_all)[rows]  # (B, d)
        sizes = groups.sizes(dtype)
        n_pos = float(b) if sizes is None else sizes[rows].sum()
        local = -(_siglip_fwd_tiles(xs, t_all, bb, chunk) + (xs * pos_t).sum() + bb * n_pos) / n_global
        loss = local if comm is None else comm.all_reduce_sum(local)

        ctx.save_for_backward(img, txt, scale, bias)
        ctx.labels_all, ctx.chunk, ctx.comm = labels_all, chunk, comm
        ctx.offset, ctx.world, ctx.t_all = offset, world, t_all if comm is not None else None
        return loss.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        img, txt, scale, bias = ctx.saved_tensors
        comm, world = ctx.comm, ctx.world
        dtype = _compute_dtype(img)
        x = img.detach().to(dtype)
        s = scale.detach().to(dtype).reshape(())
        bb = bias.detach().to(dtype).reshape(())
        t_all = txt.detach().to(dtype) if comm is None else ctx.t_all
        n_global, b = t_all.shape[0], x.shape[0]
        rows = slice(ctx.offset, ctx.offset + b)
        mm_dtype = img.dtype if img.dtype in (torch.bfloat16, torch.float16) else dtype
        g = grad_out.to(dtype)

        xs = x * s
        gx, gy, gsum = _siglip_grad_tiles(xs, t_all, bb, ctx.chunk, mm_dtype)
        groups = _Groups(ctx.labels_all)
        pos_t = _group_sums(groups, t_all)[rows]  # (B, d)
        pos_x = _group_sums(groups, x, rows=rows, n_global=n_global)  # (N, d)
        sizes = groups.sizes(dtype)
        n_pos = float(b) if sizes is None else sizes[rows].sum()
        # dLoss/dx_ij = (σ(x_ij) − P_ij)/N
        d_img = (gx - pos_t) * (s * g / n_global)
        d_txt_all = (gy - pos_x * s) * (g / n_global)  # gy already carries s (against s·I)
        d_scale = (d_img * x).sum() / s
        d_bias = (gsum - n_pos) * (g / n_global)
        if comm is not None:
            d_txt_all = comm.all_reduce_sum(d_txt_all)
        d_txt = d_txt_all[rows]
        if world > 1:
            d_img, d_txt, d_scale, d_bias = (t * world for t in (d_img, d_txt, d_scale, d_bias))
        return (
            d_img.to(img.dtype) if ctx.needs_input_grad[0] else None,
            d_txt.to(txt.dtype) if ctx.needs_input_grad[1] else None,
            d_scale.to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None,
            d_bias.to(bias.dtype).reshape(bias.shape) if ctx.needs_input_grad[3] else None,
            None, None, None,
        )


# --------------------------------------------------------------------------------------
# Public functions and modules
# --------------------------------------------------------------------------------------


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = None,
    distributed: Distributed = False,
) -> Tensor:
    """CLIP's symmetric contrastive (InfoNCE) loss ``½ (CE(s·I·Tᵀ, Y) + CE(s·T·Iᵀ, Y))``.

    Args:
        image_features: (N, d) image embeddings, used as given (normalise them first for
            cosine similarities; the model's ``forward`` does).
        text_features: (N, d) caption embeddings; row i is image i's caption.
        logit_scale: the multiplier s > 0 (already exponentiated), a float or a scalar
            tensor that may require grad.
        labels: optional (N,) integer group ids: items with equal ids are all positives of
            each other and the target is uniform over them.  Default: ``arange(N)``.
        label_smoothing: ε in [0, 1): targets become ``(1 − ε) Y + ε / N``.
        chunk_size: None for the plain N×N formula; an int tile edge or ``"auto"`` for the
            tiled computation that never holds more than one tile of the matrix.
        distributed: False; True or ``"auto"`` to gather across ``torch.distributed``
            ranks (each rank passes its local rows; see docs/loss.md §Distributed); or a
            :class:`clipforge.distributed.Comm`.

    Returns the scalar loss (float32, or float64 for float64 features).  bf16 and fp16
    features are accumulated in float32.
    """
    scale, _ = _check_inputs(image_features, text_features, logit_scale, labels, chunk_size)
    eps = float(label_smoothing)
    if not (0.0 <= eps < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    comm = _resolve_comm(distributed)
    if chunk_size is None:
        if comm is None:
            return _clip_loss_naive(image_features, text_features, scale, labels, eps)
        img, txt, labels_all = comm.gather_with_grad(image_features, text_features, labels)
        return _clip_loss_naive(img, txt, scale, labels_all, eps)
    chunk = _chunk(chunk_size, image_features, comm)
    return _TiledClipLoss.apply(image_features, text_features, scale, labels, eps, chunk, comm)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    labels: Tensor | None = None,
    chunk_size: ChunkSize = None,
    distributed: Distributed = False,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss ``−(1/N) Σ_ij log σ(z_ij (s ⟨I_i, T_j⟩ + b))``.

    ``z_ij = +1`` for positives (``i = j``, or equal ``labels``) and −1 otherwise; the sum
    over all N² pairs is divided by N, as in the SigLIP paper and OpenCLIP's
    ``SigLipLoss``.  Other arguments as in :func:`clip_loss`.
    """
    scale, bias = _check_inputs(image_features, text_features, logit_scale, labels, chunk_size, logit_bias)
    comm = _resolve_comm(distributed)
    if chunk_size is None:
        if comm is None:
            return _siglip_loss_naive(image_features, text_features, scale, bias, labels)
        img, txt, labels_all = comm.gather_with_grad(image_features, text_features, labels)
        return _siglip_loss_naive(img, txt, scale, bias, labels_all)
    chunk = _chunk(chunk_size, image_features, comm)
    return _TiledSigLipLoss.apply(image_features, text_features, scale, bias, labels, chunk, comm)


def _chunk(chunk_size: ChunkSize, feats: Tensor, comm: "Comm | None") -> int:
    if chunk_size == "auto":
        n_global = feats.shape[0] * (1 if comm is None else comm.world_size)
        return auto_chunk_size(n_global, feats.shape[1], device=feats.device)
    return int(chunk_size)  # type: ignore[arg-type]


class ClipLoss(nn.Module):
    """Module form of :func:`clip_loss`: ``ClipLoss()(image_features, text_features, s)``.

    Defaults to the tiled computation (``chunk_size="auto"``) and to gathering across
    ranks when ``torch.distributed`` is initialised with more than one process.
    """

    def __init__(
        self,
        *,
        label_smoothing: float = 0.0,
        chunk_size: ChunkSize = "auto",
        distributed: Distributed = "auto",
    ) -> None:
        super().__init__()
        if not (0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = chunk_size
        self.distributed = distributed

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, *, labels: Tensor | None = None
    ) -> Tensor:
        return clip_loss(
            image_features, text_features, logit_scale, labels=labels,
            label_smoothing=self.label_smoothing, chunk_size=self.chunk_size, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size!r}, distributed={self.distributed!r}"


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss`: ``SigLipLoss()(img, txt, s, b)``."""

    def __init__(self, *, chunk_size: ChunkSize = "auto", distributed: Distributed = "auto") -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.distributed = distributed

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float,
        *,
        labels: Tensor | None = None,
    ) -> Tensor:
        return siglip_loss(
            image_features, text_features, logit_scale, logit_bias, labels=labels,
            chunk_size=self.chunk_size, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size!r}, distributed={self.distributed!r}"
