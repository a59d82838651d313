"""Wall-clock timing shared by the benchmark scripts, and the record of the CPU the figures came from."""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def fastest(fn: Callable[[], object], reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn``, after one warm-up call: on a shared
    machine the least disturbed call is the best estimate of the work itself."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"): /proc/cpuinfo's "model name", else lscpu's
    "Model name" (ARM machines), else what `platform` knows (often only "x86_64")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def cpu_record() -> dict[str, str]:
    """What every benchmark writes beside its figures, under "cpu": the CPU's model, the
    instruction-set level PyTorch dispatches its kernels on, and whether bf16 is native there
    (bf16 figures from a CPU that emulates it are many times slower and mean something else)."""
    import torch

    from clipforge.devices import cpu_description

    return {
        "model": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "description": cpu_description(),
    }
