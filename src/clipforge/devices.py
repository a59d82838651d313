"""Where a model runs and in which precision: the checks that inference and training share.

    device = default_device(None)                  # cuda if there is one, else cpu
    note = check_precision("bf16", device)         # a ValueError if it cannot run there; else a
                                                   # warning text (or None) to show the user

A precision is "fp32", "bf16" (autocast over fp32 weights) or, for training on CUDA, "fp16"
(autocast with a gradient scaler).  fp16 needs CUDA: PyTorch's gradient scaler has no CPU
implementation to unscale with.  bf16 runs everywhere, but only CPUs with native bf16
instructions (AVX-512 BF16 or AMX) run it fast; elsewhere PyTorch emulates it, and bf16 matrix
products run at a small fraction of fp32's speed, so the check returns a warning saying so.
"""

from __future__ import annotations

import torch

__all__ = ["INFERENCE_PRECISIONS", "TRAINING_PRECISIONS", "check_precision", "cpu_description",
           "default_device", "native_cpu_bf16"]

INFERENCE_PRECISIONS = ("fp32", "bf16")
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a `torch.device`; None picks the first CUDA device if there is one, else the CPU.

    A ValueError names a device string PyTorch does not know, or a CUDA device this machine lacks.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:  # PyTorch's message lists twenty device types; the common ones say enough
        raise ValueError(f"device {device!r} is not a device PyTorch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if chosen.type == "meta":
        raise ValueError(f"device {device!r} holds shapes but no values; use cpu or cuda")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    backend = getattr(torch, chosen.type, None)  # torch.mps, torch.xpu, ...: each says if it is there
    if chosen.type not in ("cpu", "cuda") and callable(getattr(backend, "is_available", None)):
        if not backend.is_available():
            raise ValueError(f"device {device!r}: {chosen.type} is not available on this machine; use cpu")
    return chosen


def native_cpu_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); None when PyTorch cannot say."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(callable(p) for p in probes):
        return None
    return any(bool(p()) for p in probes if callable(p))


def cpu_description() -> str:
    """The CPU's instruction-set level as PyTorch dispatches on it, and whether bf16 is native:
    what a benchmark records beside its figures."""
    native = native_cpu_bf16()
    bf16 = "unknown" if native is None else ("native" if native else "emulated")
    return f"{torch.backends.cpu.get_cpu_capability()}, bf16 {bf16}"


def check_precision(precision: str, device: str | torch.device, *, training: bool = False) -> str | None:
    """Checks that ``precision`` can run on ``device``: a one-line ValueError if it cannot, else a
    one-line warning text when it runs but slowly (bf16 emulated on this CPU), else None."""
    allowed = TRAINING_PRECISIONS if training else INFERENCE_PRECISIONS
    if precision not in allowed:
        note = " (fp16 is for training on CUDA)" if precision == "fp16" else ""
        raise ValueError(f"precision must be one of {', '.join(allowed)}{note}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device (its gradient scaler runs there), not {kind}; "
                         "use fp32, or bf16 on a CPU with native bf16")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16: this CUDA device has no bf16 support; use fp16 (training) or fp32")
    if precision == "bf16" and kind == "cpu" and native_cpu_bf16() is False:
        return (f"precision bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, without AVX-512 BF16 "
                "or AMX) is emulated: bf16 matrix products run many times slower than fp32 here; "
                "use fp32, faster here and exact")
    return None
