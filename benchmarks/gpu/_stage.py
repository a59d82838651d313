"""What the GPU check's stages share: their arguments, their rows, and timing and memory on the device.

A stage is a script run by benchmarks/gpu_check.py in its own process, with src/ and the
scratch install on PYTHONPATH.  It appends one JSON line per measured case to ``--rows`` as
soon as the case is done, so that a stage killed at the end of its box keeps what it measured,
and it marks the cases it has no time left for ("skipped: time box") once ``--deadline`` passes.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

# Timed calls per case at most; a dry run times one (it checks the machinery, measures nothing).
max_reps = 5


def parse(description: str) -> argparse.Namespace:
    global max_reps
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=Path, required=True, help="JSON lines, one per case, appended")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="time.time() after which no case starts")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, at tiny sizes")
    args = parser.parse_args()
    if args.dry_run:
        max_reps = 1
    return args


class Rows:
    """The stage's results, one JSON line each, written as they come."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        self.own_errors = 0  # clipforge's own cases that failed (not out of memory, not a contender's)

    def add(self, **row) -> dict:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(" ".join(f"{k}={v}" for k, v in row.items() if k != "kind"), flush=True)
        if str(row.get("status", "")).startswith("error") and str(row.get("impl", "")).startswith("clipforge"):
            self.own_errors += 1
        return row

    def exit_status(self) -> int:
        """1 when one of clipforge's cases failed (the stage then reports "failed"), else 0: a
        contender's error, an out-of-memory and a case skipped by the time box are results."""
        return 1 if self.own_errors else 0

    def out_of_time(self) -> bool:
        return time.time() > self.deadline


def device(dry_run: bool) -> torch.device:
    """The current GPU, with its index (generators and tensors then name the same device); the CPU in a dry run."""
    if dry_run or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], object], dev: torch.device, *, reps: int = 3, max_seconds: float = 2.0) -> list[float]:
    """Seconds of up to ``reps`` calls of ``fn`` (after the caller's warm-up), fewer once
    ``max_seconds`` are spent; at least one."""
    times: list[float] = []
    reps = min(reps, max_reps)
    while len(times) < reps and (not times or sum(times) < max_seconds):
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return times


def allocated(dev: torch.device) -> int | None:
    """Bytes the caching allocator holds for tensors now; None on the CPU (no allocator statistics)."""
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def free(dev: torch.device) -> None:
    """Give back what a finished or failed case left behind."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def failure(err: BaseException) -> str:
    """A failed case's status: running out of memory is a result; anything else is an error, in one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out of memory"
    return f"error: {type(err).__name__}: {text[:200]}"


@contextmanager
def matmul_precision(precision: str):
    """fp32 matmuls and convolutions in full precision ("fp32") or on TF32 tensor cores ("tf32",
    and "bf16" for its fp32 parts); restored afterwards."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
