"""Resident-memory probes shared by the benchmark scripts (Linux /proc)."""

from __future__ import annotations


def rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, in bytes."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return cur, peak


def reset_peak() -> None:
    """Reset the peak (VmHWM) to the current resident size (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
