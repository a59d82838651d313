"""The one module that talks to ``torch.distributed``.

The losses take a :class:`Comm` — a thin handle on a process group — and never import
``torch.distributed`` themselves, so the single-process formulas stay plain.

Contract (docs/loss.md §Distributed; tested with two CPU processes over gloo in
tests/test_distributed.py): each rank passes its local rows; the loss value returned on
every rank is the loss of the global batch (all ranks' rows concatenated in rank order);
if every rank calls ``backward()`` and gradients are then averaged over ranks, as
``DistributedDataParallel`` does, every parameter receives exactly the gradient of the
single-process loss over the global batch.

Ranks may hold different numbers of rows (the last batch of an epoch): rows are padded
to the largest local size for the collective and the padding is dropped again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# PyTorch 2.13 names the gather into one tensor all_gather_single and deprecates the old name;
# older releases (the CUDA builds GPU machines carry) have only all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["Comm", "is_initialized", "init_from_env", "data_parallel", "barrier", "max_over_ranks", "shutdown",
           "sum_over_ranks"]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Comm:
    """A process group as the losses see it."""

    group: object = None  # a torch.distributed ProcessGroup; None is the default group

    @classmethod
    def from_default_group(cls) -> Comm | None:
        return cls() if is_initialized() else None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    # -- collectives without autograd (the tiled losses write their own backward) -------

    def all_gather_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Concatenate every rank's ``x`` along dim 0 in rank order.

        Returns the (Σ B_r, ...) tensor and the offset of this rank's rows in it.
        """
        sizes = self._sizes(x.shape[0], x.device)
        biggest = max(sizes)
        if x.shape[0] < biggest:
            pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
            x = torch.cat([x, pad])
        out = x.new_empty((biggest * len(sizes),) + tuple(x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=self.group)
        if all(s == biggest for s in sizes):
            return out, self.rank * biggest
        parts = [out[r * biggest : r * biggest + s] for r, s in enumerate(sizes)]
        return torch.cat(parts), sum(sizes[: self.rank])

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_logsumexp(self, v: Tensor) -> Tensor:
        """Element-wise log Σ_ranks exp(v_rank), computed stably (max, then sum)."""
        top = v.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = (v - top).exp()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.log() + top

    def _sizes(self, n: int, device: torch.device) -> list[int]:
        local = torch.tensor([n], device=device, dtype=torch.long)
        sizes = torch.empty(self.world_size, device=device, dtype=torch.long)
        _all_gather_single(sizes, local, group=self.group)
        return [int(s) for s in sizes.tolist()]

    # -- gather with autograd (the plain formulas) ------------------------------------

    def gather_with_grad(
        self, image_features: Tensor, text_features: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """All-gather features so that a loss over the global batch back-propagates.

        Every rank then computes the same global loss; the gather's backward sums the
        ranks' gradients and keeps this rank's rows, which is W times the gradient of
        the global loss with respect to them — so averaging over ranks gives exactly
        the single-process gradient.  Labels (no gradient) are gathered too; without
        labels, the default targets ``arange`` over the global batch are right because
        rows are concatenated in rank order.
        """
        img = _GatherRows.apply(image_features, self)
        txt = _GatherRows.apply(text_features, self)
        labels_all = None if labels is None else self.all_gather_rows(labels)[0]
        return img, txt, labels_all


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm) -> Tensor:  # type: ignore[override]
        out, offset = comm.all_gather_rows(x.detach())
        ctx.comm, ctx.rows = comm, slice(offset, offset + x.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return ctx.comm.all_reduce_sum(grad.contiguous())[ctx.rows], None


# -- process groups and data parallelism for the trainer ---------------------------------


def init_from_env(device_type: str) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Returns (rank, world_size, local_rank); (0, 1, 0) when the environment names no group
    (a plain ``python``/``clipforge`` run).  NCCL on CUDA, gloo on CPU.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel | None:
    """``DistributedDataParallel`` around ``module`` when a group of several processes runs; None otherwise.

    ``find_unused_parameters`` stays off.  A parameter the loss reads from the module itself
    rather than from the wrapper's output (SigLIP's logit bias) still gets its gradient in
    backward, which is all DDP needs then; with it on, DDP would mark such a parameter unused
    after the forward and fail when its gradient arrives.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return None
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _reduce_ints(values: list[int], device: torch.device, op: object) -> list[int]:
    if not is_initialized() or dist.get_world_size() == 1:
        return list(values)
    # NCCL reduces CUDA tensors only; gloo takes CPU ones
    x = torch.tensor(values, dtype=torch.long, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(x, op=op)
    return [int(v) for v in x.tolist()]


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's ``value`` (the value itself in a single process).  The trainer
    agrees on a stop this way: one integer a step, so every rank stops after the same step."""
    return _reduce_ints([value], device, dist.ReduceOp.MAX)[0]


def sum_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Each of ``values`` summed over the ranks (the values themselves in a single process): counts
    that each rank keeps for its own share of the data."""
    return _reduce_ints(values, device, dist.ReduceOp.SUM)


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
