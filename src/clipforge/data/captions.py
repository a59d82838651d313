"""Image–caption pairs from a CSV/TSV or JSON Lines file.

    filepath<TAB>title                     {"filepath": "img/1.jpg", "title": "a red bus"}
    img/1.jpg<TAB>a red bus                {"image": "img/2.jpg", "captions": ["a cat", "a pet"]}
    img/1.jpg<TAB>a bus at a stop

- Columns: the image path and the caption column are named by ``image_key`` and
  ``caption_key``; when not given, the first present of `IMAGE_KEYS` and `CAPTION_KEYS` is
  used (OpenCLIP's ``filepath``/``title`` come first).  In JSON Lines a caption value may be a
  list of captions.
- CSV separator: ``sep`` (``"\\t"``, ``","``, or the names ``tab``/``comma``); when not given,
  a tab if the header line holds one, else a comma.  Standard CSV quoting applies.
- Relative image paths are resolved against the folder holding the file.
- Rows naming the same image (after resolution) are one image with several captions, in the
  order the image first appears.
- Errors: a file that is missing, empty or not UTF-8 (`clipforge.data.text.read_text`), or a
  malformed line (wrong number of CSV fields, invalid JSON, a missing key, an empty image
  path, a caption that is not a string) raises a DataError naming the file and line.
  An empty caption is a data-level gap: the row is skipped and counted in ``empty_captions``.
  Blank lines are ignored.  Unreadable images are found later, when the images are read.

A `CaptionSet` is a `CaptionedSource`: its first N images are the first N distinct image paths,
each with all of its captions.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from clipforge.data._errors import DataError
from clipforge.data.images import ImageLoader, read_rgb
from clipforge.data.protocols import CaptionIndex, first_n
from clipforge.data.text import lines, read_text

__all__ = ["CAPTION_KEYS", "IMAGE_KEYS", "CaptionSet", "open_csv", "open_jsonl", "read_captions"]

IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "filename", "path", "img", "file")
CAPTION_KEYS = ("title", "caption", "captions", "text", "sentence", "sentences")
_SEPARATORS = {"tab": "\t", "\\t": "\t", "comma": ",", ",": ",", "\t": "\t", ";": ";", "|": "|"}


@dataclass
class CaptionSet:
    """Images and their captions; caption j describes image ``text_to_image[j]``."""

    source: str  # the URI or file it came from, for messages
    image_paths: list[Path]  # one per distinct image, in order of first appearance
    captions: list[str]
    text_to_image: list[int]
    empty_captions: int = 0  # rows skipped because their caption was empty

    # Map-style access, as training reads it: one (image, caption) pair per caption.
    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """Caption ``index`` and its image, decoded in RGB (OSError when missing or unreadable)."""
        return read_rgb(self.image_paths[self.text_to_image[index]]), self.captions[index]

    def caption(self, index: int) -> str:
        """Caption ``index`` without reading its image."""
        return self.captions[index]

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, unreadable files skipped (see `ImageLoader`)."""
        paths = self.image_paths[: first_n(len(self.image_paths), limit)]
        return ImageLoader(paths, transform, batch_size=batch_size, num_workers=num_workers, source=self.source)

    def caption_index(self, limit: int | None = None) -> CaptionIndex:
        """The captions of the first ``limit`` images, in the file's order; ``skipped`` counts the
        file's empty captions."""
        n = first_n(len(self.image_paths), limit)
        keep = [j for j, i in enumerate(self.text_to_image) if i < n]
        captions = [self.captions[j] for j in keep]
        return CaptionIndex(captions, [self.text_to_image[j] for j in keep], self.empty_captions)

    def select_images(self, kept: Sequence[int]) -> CaptionSet:
        """The set restricted to the images ``kept`` (indices, e.g. `ImageLoader.kept`) and
        their captions, re-indexed."""
        new_index = {old: new for new, old in enumerate(kept)}
        pairs = [(c, new_index[i]) for c, i in zip(self.captions, self.text_to_image) if i in new_index]
        return CaptionSet(
            self.source, [self.image_paths[i] for i in kept], [c for c, _ in pairs], [i for _, i in pairs],
            self.empty_captions,
        )


def _choose(given: str | None, available: Iterable[str], candidates: tuple[str, ...], what: str, where: str) -> str:
    available = list(available)
    if given is not None:
        if given not in available:
            raise DataError(f"{where}: no {what} column {given!r}; columns are {available}")
        return given
    for name in candidates:
        if name in available:
            return name
    raise DataError(f"{where}: none of the columns {available} is a known {what} column {list(candidates)}; name it")


class _Builder:
    """Groups (image path, caption) rows into a CaptionSet."""

    def __init__(self, path: Path) -> None:
        self.path, self.base = path, path.parent
        self.index: dict[str, int] = {}
        self.captions: list[str] = []
        self.text_to_image: list[int] = []
        self.empty = 0

    def add(self, image: object, captions: Sequence[object], line: int) -> None:
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{self.path}:{line}: the image path is empty or not a string ({image!r})")
        resolved = os.path.normpath(self.base / image.strip())
        for caption in captions:
            if not isinstance(caption, str):
                raise DataError(f"{self.path}:{line}: a caption must be a string, got {caption!r}")
            if not caption.strip():
                self.empty += 1
                continue
            self.captions.append(caption)
            self.text_to_image.append(self.index.setdefault(resolved, len(self.index)))

    def build(self, source: str) -> CaptionSet:
        if not self.captions:
            raise DataError(f"{self.path}: no image with a non-empty caption")
        return CaptionSet(source, [Path(p) for p in self.index], self.captions, self.text_to_image, self.empty)


def _read_csv(path: Path, *, image_key: str | None, caption_key: str | None, sep: str | None) -> CaptionSet:
    if sep is not None and sep not in _SEPARATORS and len(sep) != 1:
        raise DataError(f"{path}: separator {sep!r} is neither one character nor one of {sorted(_SEPARATORS)}")
    builder = _Builder(path)
    # line ends kept as they are (newline=""): csv needs them for quoted fields that span lines
    file = io.StringIO(read_text(path, what="caption file"), newline="")
    first = file.readline()
    if not first.strip():
        raise DataError(f"{path}:1: no header line (expected e.g. filepath<TAB>title)")
    delimiter = _SEPARATORS.get(sep, sep) if sep is not None else ("\t" if "\t" in first else ",")
    file.seek(0)
    reader = csv.reader(file, delimiter=delimiter)
    header = [name.strip() for name in next(reader)]
    image_col = header.index(_choose(image_key, header, IMAGE_KEYS, "image path", f"{path}:1"))
    caption_col = header.index(_choose(caption_key, header, CAPTION_KEYS, "caption", f"{path}:1"))
    try:
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row)} field(s) where the header has {len(header)} "
                    f"(separator {delimiter!r}; quote fields that hold it)"
                )
            builder.add(row[image_col], [row[caption_col]], reader.line_num)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err
    return builder.build(f"csv:{path}")


def _read_jsonl(path: Path, *, image_key: str | None, caption_key: str | None) -> CaptionSet:
    builder = _Builder(path)
    keys: tuple[str, str] | None = None
    for line_number, line in enumerate(lines(read_text(path, what="caption file")), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_number}: not valid JSON: {err.msg} (column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        if keys is None:
            where = f"{path}:{line_number}"
            keys = (
                _choose(image_key, record, IMAGE_KEYS, "image path", where),
                _choose(caption_key, record, CAPTION_KEYS, "caption", where),
            )
        for key in keys:
            if key not in record:
                raise DataError(f"{path}:{line_number}: no {key!r} key (keys: {sorted(record)})")
        captions = record[keys[1]]
        builder.add(record[keys[0]], captions if isinstance(captions, list) else [captions], line_number)
    return builder.build(f"jsonl:{path}")


def read_captions(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
) -> CaptionSet:
    """Reads a caption file; ``format`` is "csv" or "jsonl" (by default from the suffix:
    ``.jsonl``/``.json`` → jsonl, else csv).  Layout and error rules in the module notes."""
    path = Path(path)
    if format is None:
        format = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "csv"
    if format == "jsonl":
        if sep is not None:
            raise DataError(f"{path}: a JSON Lines file takes no separator")
        return _read_jsonl(path, image_key=image_key, caption_key=caption_key)
    if format == "csv":
        return _read_csv(path, image_key=image_key, caption_key=caption_key, sep=sep)
    raise ValueError(f"format must be 'csv' or 'jsonl', got {format!r}")


def open_csv(
    location: str, *, image_key: str | None = None, caption_key: str | None = None, sep: str | None = None
) -> CaptionSet:
    """Opener of ``csv:FILE`` URIs."""
    if not location:
        raise DataError("csv: needs a file, e.g. csv:captions.tsv")
    return read_captions(location, format="csv", image_key=image_key, caption_key=caption_key, sep=sep)


def open_jsonl(location: str, *, image_key: str | None = None, caption_key: str | None = None) -> CaptionSet:
    """Opener of ``jsonl:FILE`` URIs."""
    if not location:
        raise DataError("jsonl: needs a file, e.g. jsonl:captions.jsonl")
    return read_captions(location, format="jsonl", image_key=image_key, caption_key=caption_key)
