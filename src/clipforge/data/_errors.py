"""The error every data source raises for unusable input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Input a data source cannot use; the message names the URI, the folder, or the file and line."""
