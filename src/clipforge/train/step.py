"""One training step, pure: gradients (exact under accumulation), the update, the optimiser and schedule.

Gradient accumulation caches features (as GradCache does): the K micro-batches are first
encoded without a graph, the loss of the whole batch is computed once on those features,
and each micro-batch is then re-encoded with a graph and back-propagated with its slice of
the features' gradient.  Every parameter — the logit scale included — gets exactly the
gradient of one batch of K× the size (tests/test_train.py checks it in float64); a loss
back-propagated once per micro-batch would count the temperature's gradient K times.

Rows that show the same image (a caption file with several captions per image) are
positives of each other: the micro-batches' ``groups`` become the loss's ``labels``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from clipforge.data.batches import MicroBatch
from clipforge.loss import ChunkSize, clip_loss, siglip_loss
from clipforge.train.config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["train_step", "compute_gradients", "build_optimizer", "lr_factor"]


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _f32(x: Tensor) -> Tensor:
    """Autocast's half-precision features to float32 for the loss; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _loss(kind: str, img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor | None, labels: Tensor | None, *,
          eps: float, chunk: ChunkSize) -> Tensor:
    if kind == "siglip":
        return siglip_loss(img, txt, scale, bias, labels=labels, chunk_size=chunk, distributed="auto")
    return clip_loss(img, txt, scale, labels=labels, label_smoothing=eps, chunk_size=chunk, distributed="auto")


def _labels(micro_batches: Sequence[MicroBatch]) -> Tensor | None:
    """The loss's group labels for the micro-batches taken together: the image of each row, so
    that rows showing the same image are positives of each other; None when every row is its
    own image.  Under data parallelism the loss gathers them from every rank; they are the
    source's own image indices, the same on every rank, so they need no offset."""
    if micro_batches[0].groups is None:
        return None
    return torch.cat([mb.groups for mb in micro_batches]).to(micro_batches[0].images.device)


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module):
    """``module``'s BatchNorm layers normalise by batch statistics without updating their running ones.

    With ``track_running_stats`` off, a training-mode BatchNorm uses the batch's statistics and
    leaves its running ones (and ``num_batches_tracked``) alone: nothing to copy and restore.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def compute_gradients(
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    *,
    ddp: DistributedDataParallel | None = None,
    loss: str = "clip",
    label_smoothing: float = 0.0,
    chunk_size: ChunkSize = "auto",
    precision: str = "fp32",
    loss_scale: float = 1.0,
) -> dict[str, float]:
    """Accumulate into ``.grad`` the gradient of the loss of the micro-batches taken together.

    ``model`` is a CLIP model (``img, txt, scale = model(images, tokens)``), compiled or not;
    SigLIP's bias is read from ``model.logit_scale.bias``.  ``ddp`` is its
    ``DistributedDataParallel`` wrapper under data parallelism: the forwards that back-propagate
    then run through it, which all-reduces the gradients once, on the last micro-batch.  The
    bias is used outside the wrapper's forward; that is allowed because the wrapper is built
    without ``find_unused_parameters`` (`clipforge.distributed.data_parallel`).

    Returns the loss, scale and bias (floats); the loss is NaN/inf when it was not finite, in
    which case nothing was back-propagated.  ``loss_scale`` multiplies what is back-propagated (fp16).
    """
    device = micro_batches[0].images.device
    forward = model if ddp is None else ddp  # the forward that builds the graph back-propagated
    bias_param = model.logit_scale.bias
    labels = _labels(micro_batches)
    kw = dict(eps=label_smoothing, chunk=chunk_size)
    if len(micro_batches) == 1:
        mb = micro_batches[0]
        with _autocast(precision, device):
            img, txt, scale = forward(mb.images, mb.tokens)
        value = _loss(loss, _f32(img), _f32(txt), scale, bias_param, labels, **kw)
        if torch.isfinite(value):
            (value * loss_scale).backward()
        return _stats(value, scale, bias_param)

    # 1. features of every micro-batch, without a graph (BatchNorm running statistics are left
    #    as they were: step 3 runs each micro-batch again and updates them once)
    with torch.no_grad(), _autocast(precision, device), _batchnorm_stats_frozen(model):
        parts = [model(mb.images, mb.tokens) for mb in micro_batches]
    img_all = torch.cat([_f32(p[0]) for p in parts]).requires_grad_()
    txt_all = torch.cat([_f32(p[1]) for p in parts]).requires_grad_()
    scale = parts[0][2].detach().requires_grad_()
    bias = None if bias_param is None else bias_param.detach().requires_grad_()
    # 2. the loss of the whole batch, once: gradients of the features, the scale and the bias
    value = _loss(loss, img_all, txt_all, scale, bias, labels, **kw)
    if not torch.isfinite(value):
        return _stats(value, scale, bias)
    (value * loss_scale).backward()
    # 3. re-encode each micro-batch with a graph and push its slice of the feature gradient
    sizes = [len(mb) for mb in micro_batches]
    g_img, g_txt = img_all.grad.split(sizes), txt_all.grad.split(sizes)
    for k, mb in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with sync:
            with _autocast(precision, device):
                img, txt, s = forward(mb.images, mb.tokens)
            outputs = [_f32(img), _f32(txt), s]
            grads = [g_img[k], g_txt[k], scale.grad if last else torch.zeros_like(s)]
            if bias_param is not None:
                outputs.append(bias_param)
                grads.append(bias.grad if last else torch.zeros_like(bias_param))
            torch.autograd.backward(outputs, grads)
    return _stats(value, scale, bias)


def _stats(value: Tensor, scale: Tensor, bias: Tensor | None) -> dict[str, float]:
    out = {"loss": float(value.detach()), "logit_scale": float(scale.detach())}
    if bias is not None:
        out["logit_bias"] = float(bias.detach())
    return out


def train_step(
    model: nn.Module,
    micro_batches: Sequence[MicroBatch],
    optimizer: torch.optim.Optimizer,
    *,
    config: TrainConfig,
    ddp: DistributedDataParallel | None = None,
    scaler: Any = None,
) -> dict[str, float]:
    """One optimiser step: gradients, clipping, update, temperature clamp.  No I/O.

    ``model`` and ``ddp`` as in `compute_gradients`.  A non-finite loss or gradient skips the
    update (``skipped`` = 1 in the result).
    """
    optimizer.zero_grad(set_to_none=True)
    loss_scale = 1.0
    if scaler is not None:  # scale() creates the scaler's scale on first use; get_scale() alone does not
        loss_scale = float(scaler.scale(torch.ones((), device=next(model.parameters()).device)))
    stats = compute_gradients(
        model, micro_batches, ddp=ddp, loss=config.loss, label_smoothing=config.label_smoothing,
        chunk_size=config.chunk_size, precision=config.precision, loss_scale=loss_scale,
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not math.isfinite(stats["loss"]):
        optimizer.zero_grad(set_to_none=True)
        return {**stats, "grad_norm": float("nan"), "skipped": 1.0}
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when the gradients overflowed
        scaler.update()
        skipped = not math.isfinite(norm)
    elif math.isfinite(norm):
        optimizer.step()
        skipped = False
    else:
        skipped = True
    model.logit_scale.clamp_()
    return {**stats, "grad_norm": norm, "skipped": float(skipped)}


# --------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on gains, biases, embeddings and the logit scale and bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or name.startswith("logit_scale")
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps)
    params = decay + no_decay
    # The fused kernel updates every tensor in one pass (on the CPU, PyTorch's default loops
    # over the tensors; benchmarks/bench_train.py measures the step).  It needs floating-point
    # parameters on one device of a kind it supports.
    devices = {p.device.type for p in params}
    if params and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params):
        return torch.optim.AdamW(groups, fused=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_factor(step: int, config: TrainConfig, *, replanned: tuple[int, float] | None = None) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``config.steps``.

    ``replanned``: (k, f) for a run extended on resume at step k, where the factor was f: from k
    on, the cosine runs from f down to ``min_lr_ratio`` at the new ``config.steps`` instead.
    """
    if replanned is not None and step >= replanned[0]:
        since, start = replanned
        progress = min(1.0, (step - since) / max(1, config.steps - since))
        return config.min_lr_ratio + (start - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


