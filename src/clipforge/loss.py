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
from typing import TYPE_CHECKING, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge._tiled import _compute_dtype, _TiledClipLoss, _TiledSigLipLoss, auto_chunk_size

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

ChunkSize = int | Literal["auto"] | None
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Released checkpoints may store log s a hair above log 100 (OpenAI's: 4.6052, i.e.
        # s = 100.0035) and use it unclamped: lift the cap to the stored value so loaded
        # weights give the numbers they gave where they were made.
        stored = state_dict.get(prefix + "log_scale")
        if isinstance(stored, Tensor) and stored.numel() == 1 and torch.isfinite(stored).all():
            self.max_scale = max(self.max_scale, math.exp(float(stored)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def clip(cls) -> LogitScale:
        """CLIP's initialisation: s = 1/0.07, no bias."""
        return cls(CLIP_INIT_SCALE)

    @classmethod
    def siglip(cls) -> LogitScale:
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
        # One read pass: a NaN or Inf anywhere makes the sum non-finite (an overflowing sum
        # of finite values only costs the exact check below).
        if not math.isfinite(float(x.detach().sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
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
    if chunk_size is not None and chunk_size != "auto" and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None, 'auto' or a positive int, got {chunk_size!r}")
    return scale, bias


def _as_scalar_tensor(value: Tensor | float, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features on {device}")
        return value.reshape(()).to(device)  # a CPU scalar joins CUDA features; gradients still reach it
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), device=device)
    raise ValueError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")


def _resolve_comm(distributed: Distributed) -> Comm | None:
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


def _chunk(chunk_size: ChunkSize, feats: Tensor, comm: Comm | None) -> int:
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
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        *,
        labels: Tensor | None = None,
    ) -> Tensor:
        return clip_loss(
            image_features, text_features, logit_scale, labels=labels,
            label_smoothing=self.label_smoothing, chunk_size=self.chunk_size, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, chunk_size={self.chunk_size!r}, "
                f"distributed={self.distributed!r}")


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
