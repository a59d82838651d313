"""The error every step of reading a checkpoint raises, and a helper for its messages.

Private to `clipforge.checkpoints`: other packages import `CheckpointError` from there.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def few(items: list, limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
