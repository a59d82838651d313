"""The GPU check's loss stage: the CLIP loss, forward + backward, four implementations side by side.

    python3 benchmarks/gpu/stage_loss.py --rows rows.jsonl [--deadline T] [--dry-run]

Run by benchmarks/gpu_check.py.  For each size (N, d) and precision it writes one row per
implementation: the fastest of up to three timed calls after a warm-up, the peak memory the
allocator held beyond the inputs (the features' gradients included), and TFLOP/s counted two
ways: by the FLOPs the implementation performs and by the 6·N²·d of the plain formula.  It
first measures the device's rate for the tiled loss's own matmul shape.  Running out of memory
is a result; an implementation that cannot be imported says why.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _stage  # benchmarks/gpu/_stage.py
import torch
import torch.nn.functional as F

# The sizes, the goal's case (N = 64k, d = 1024) first; tiny ones for the dry run.
SIZES = [(65536, 1024), (16384, 512), (16384, 1024), (65536, 512)]
DRY_SIZES = [(256, 64), (128, 32), (128, 64), (256, 32)]
# inputs fp32 with TF32 off, fp32 with TF32 on, bf16 (with TF32 on for whatever runs in fp32)
PRECISIONS = ("bf16", "tf32", "fp32")
# FLOPs of forward + backward, in units of N²·d (one N×N·d matmul is 2 N²·d):
#   plain formula: the logits once, then the two gradient products          2 + 4 = 6
#   clipforge tiled: the logits again in backward (one tile at a time)     2 + 2 + 4 = 8
#   OpenCLIP's ClipLoss: the logits twice (both directions), four products  4 + 8 = 12
#   Inf-CL: per direction its forward, then the dq and dk kernels each recompute the logits
#           (2 + 4 + 4), for both directions                                  2 × 10 = 20
IMPLEMENTATIONS = {"clipforge tiled": 8, "plain formula": 6, "OpenCLIP ClipLoss": 12, "Inf-CL": 20}
USEFUL = 6


def computes(impl: str, precision: str) -> str:
    """What an implementation's matmuls run in, for a precision's inputs and TF32 setting."""
    if impl == "Inf-CL":
        return "TF32 (Triton), fp32 copies"  # _cal_inf_loss casts to float; tl.dot defaults to TF32
    if precision == "bf16":
        return "bf16" if impl == "OpenCLIP ClipLoss" else "TF32 logits, bf16 grads" if impl == "clipforge tiled" \
            else "TF32 (fp32 copies)"
    return "TF32" if precision == "tf32" else "fp32"


class Unavailable(Exception):
    """An implementation that cannot run here, and why."""


def contender(impl: str, dev: torch.device, tmp: Path):
    """``fn(img, txt, scale) -> loss`` for one implementation."""
    from clipforge import clip_loss

    if impl == "clipforge tiled":
        return lambda img, txt, s: clip_loss(img, txt, s, chunk_size="auto")
    if impl == "plain formula":
        return lambda img, txt, s: clip_loss(img, txt, s, chunk_size=None)
    if impl == "OpenCLIP ClipLoss":
        try:
            from open_clip.loss import ClipLoss
        except Exception as err:  # any import failure is this row's result
            raise Unavailable(f"open_clip: {type(err).__name__}: {err}") from None
        loss = ClipLoss()
        return lambda img, txt, s: loss(img, txt, s)
    if dev.type != "cuda":
        raise Unavailable("Inf-CL's kernels are Triton's and need CUDA")
    try:
        from inf_cl import cal_inf_loss
    except Exception as err:
        raise Unavailable(f"inf_cl: {type(err).__name__}: {err}") from None
    import torch.distributed as dist

    # Its scale gradient is all-reduced (GradientGather), so it needs a process group: one rank.
    if not dist.is_initialized():
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", store=dist.FileStore(str(tmp / "store"), 1), rank=0, world_size=1)
    return lambda img, txt, s: 0.5 * (cal_inf_loss(img, txt, scale=s) + cal_inf_loss(txt, img, scale=s))


def ready(impl: str, dev: torch.device, tmp: Path):
    """The implementation's function, or why it cannot run (kept: it is not tried again)."""
    try:
        return contender(impl, dev, tmp)
    except Unavailable as err:
        return err
    except Exception as err:  # e.g. the process group could not start
        return Unavailable(f"{type(err).__name__}: {str(err).strip()[:200]}")


def features(n: int, d: int, dtype: torch.dtype, dev: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    x = F.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)
    return x.to(dtype).requires_grad_()


def measure(fn, img, txt, scale, dev):
    """(loss, fastest seconds, extra peak bytes) of forward + backward."""

    def step():
        img.grad = txt.grad = scale.grad = None
        loss = fn(img, txt, scale)
        loss.backward()
        return loss

    loss = float(step())  # warm-up: Triton compiles, cuBLAS sizes its workspace
    img.grad = txt.grad = scale.grad = None
    _stage.free(dev)
    base = _stage.allocated(dev)
    _stage.reset_peak(dev)
    times = _stage.timed(step, dev)
    peak = _stage.peak(dev)
    img.grad = txt.grad = scale.grad = None
    return loss, min(times), None if peak is None else peak - base


def matmul_rate(dev: torch.device, tile: int, d: int, precision: str, seconds: float = 0.25) -> float:
    """TFLOP/s of (tile × d) @ (d × tile), the tiled loss's inner product, in ``precision``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with _stage.matmul_precision(precision):
        a = torch.randn(tile, d, device=dev, dtype=dtype)
        b = torch.randn(tile, d, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b.T
        _stage.sync(dev)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):
                a @ b.T
            reps += 10
            _stage.sync(dev)
        return 2 * tile * tile * d * reps / (time.perf_counter() - start) / 1e12


def main() -> int:
    args = _stage.parse(__doc__.split("\n")[0])
    rows = _stage.Rows(args.rows, args.deadline)
    dev = _stage.device(args.dry_run)
    from clipforge.loss import CLIP_INIT_SCALE, auto_chunk_size

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-loss-"))
    fns: dict[str, object] = {}
    order = 0
    for n, d in DRY_SIZES if args.dry_run else SIZES:
        tile = auto_chunk_size(n, d, device=dev)
        if rows.out_of_time():
            rates = dict.fromkeys(PRECISIONS)
        else:
            rates = {p: matmul_rate(dev, tile, d, p, seconds=0.05 if args.dry_run else 0.25) for p in PRECISIONS}
        rows.add(kind="matmul", n=n, d=d, tile=tile, **rates)
        for precision in PRECISIONS:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            img, txt = features(n, d, dtype, dev, 0), features(n, d, dtype, dev, 1)
            scale = torch.tensor(CLIP_INIT_SCALE, device=dev, requires_grad=True)
            for impl, flops in IMPLEMENTATIONS.items():
                order += 1
                row = dict(kind="loss", n=n, d=d, inputs="bf16" if precision == "bf16" else "fp32",
                           tf32=precision != "fp32", impl=impl, computes=computes(impl, precision), order=order,
                           tile=tile if impl == "clipforge tiled" else None)
                if rows.out_of_time():
                    rows.add(**row, status="skipped: time box")
                    continue
                if impl not in fns:
                    fns[impl] = ready(impl, dev, tmp)
                if isinstance(fns[impl], Unavailable):
                    rows.add(**row, status=f"unavailable: {fns[impl]}")
                    continue
                try:
                    with _stage.matmul_precision(precision):
                        loss, seconds, extra = measure(fns[impl], img, txt, scale, dev)
                except Exception as err:  # out of memory, or any error, is this case's result
                    status = _stage.failure(err)
                    del err
                    _stage.free(dev)
                    rows.add(**row, status=status)
                    continue
                work = flops * n * n * d
                tflops = work / seconds / 1e12
                share = tflops / rates[precision] if impl == "clipforge tiled" and rates[precision] else None
                rows.add(**row, status="ok", seconds=seconds, extra_peak_bytes=extra, loss=loss, flops=work,
                         tflops=tflops, useful_tflops=USEFUL * n * n * d / seconds / 1e12, tile_share=share)
            del img, txt, scale
            _stage.free(dev)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

    return rows.exit_status()  # 1 when one of clipforge's own cases failed


if __name__ == "__main__":
    sys.exit(main())
