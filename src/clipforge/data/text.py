"""Reading the text files users give: caption files, class names, prompts, negatives.

    text = read_text("captions.tsv", what="caption file")

Every command reads a user's text file through `read_text`, so every command says the same
thing about the same bad file, in one line naming it:

    captions.tsv: no such caption file
    captions.tsv: a folder, not a caption file
    captions.tsv: empty caption file
    captions.tsv:2: not UTF-8 text (invalid start byte at byte 14)

The file is UTF-8; a leading byte-order mark (which Windows editors write) is dropped, and the
byte offsets in messages count from the start of the file, mark included.  Line ends are
returned as they are in the file: ``csv`` needs them untouched for quoted fields that span
lines, and `lines` splits on ``\\n``, ``\\r\\n`` and ``\\r`` alone.
"""

from __future__ import annotations

import codecs
import io
import os
from collections.abc import Iterator

from clipforge.data._errors import DataError

__all__ = ["lines", "read_text"]


def read_text(path: str | os.PathLike[str], *, what: str = "file", allow_empty: bool = False) -> str:
    """The text of the UTF-8 file at ``path``; a DataError naming the file (and the line and byte
    of the first invalid one) when it is missing, a folder, unreadable, not UTF-8, or — unless
    ``allow_empty`` — empty or only white space.  ``what`` names the file in those messages
    ("caption file", "class-name file", ...)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise DataError(f"{os.fspath(path)}: no such {what}") from None
    except IsADirectoryError:
        raise DataError(f"{os.fspath(path)}: a folder, not a {what}") from None
    except OSError as err:
        raise DataError(f"{os.fspath(path)}: cannot read the {what} ({err.strerror or err})") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"{os.fspath(path)}:{line}: not UTF-8 text ({err.reason} at byte {at})") from None
    if not allow_empty and not text.strip():
        raise DataError(f"{os.fspath(path)}: empty {what}")
    return text


def lines(text: str) -> Iterator[str]:
    """The lines of ``text`` without their ends, split on ``\\n``, ``\\r\\n`` and ``\\r`` only: unlike
    `str.splitlines`, a form feed or U+2028 inside a line (legal in a JSON string) does not end it."""
    for line in io.StringIO(text, newline=None):
        yield line.rstrip("\n")
