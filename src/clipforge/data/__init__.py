"""Data sources, named by a URI such as the ``--data`` option takes.

    source = open_data("imagefolder:val/")          # an `ImageFolder`
    source = open_data("folder:photos/")            # an `ImageFiles`
    source = open_data("csv:captions.tsv")          # a `CaptionSet`
    source = open_data("jsonl:captions.jsonl?caption_key=text")

A URI is ``scheme:location`` (``scheme://location`` works too), optionally followed by
``?key=value&key=value`` options passed to the scheme's opener as keyword arguments.  Schemes:

| scheme | location | gives | evaluation |
|---|---|---|---|
| ``imagefolder`` | a folder of class sub-folders, torchvision's ImageFolder layout | `ImageFolder` | labelled |
| ``folder`` | any folder of images, searched recursively | `ImageFiles` | none² |
| ``csv`` | a CSV/TSV file with an image path and a caption column | `CaptionSet` | captioned |
| ``jsonl`` | a JSON Lines file, one object per image or caption | `CaptionSet` | captioned |
| ``pairs`` | a folder of ``name.jpg`` + ``name.txt`` caption files | `CaptionedFolder` | captioned |
| ``shapes`` | none: ``shapes://?split=train&size=64`` | `ShapesDataset` (generated) | both¹ |
| ``digits`` | none: ``digits://?split=test`` | `DigitsDataset` | both |
| ``shards`` | tar shards: ``shards:/d/{000..099}.tar``, ``shards:pipe:CMD`` | `ShardSource` (streamed) | none |

Every source but ``shards:`` and ``folder:`` is an evaluation source: it implements
`LabelledSource` (images with class labels, for zero-shot classification), `CaptionedSource`
(images with captions, for retrieval) or both (see `clipforge.data.protocols`).  Shards are
streamed, for training only: they have no first N images to come back to at every evaluation.
¹ shapes' labels exist for the ``seen`` and ``heldout`` splits.  ² ``folder:`` has neither
labels nor captions: it is an `ImageSource`, the images alone, which an index, ``score`` and
``rerank`` read.

Another module adds a scheme with `register_scheme`; its opener receives the `DataURI`'s
location and options.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from clipforge.data._errors import DataError
from clipforge.data.captions import CaptionSet, read_captions
from clipforge.data.folder import ImageFiles, find_images
from clipforge.data.imagefolder import ImageFolder, scan_image_folder
from clipforge.data.protocols import CaptionedSource, CaptionIndex, ImageSource, LabelledSource
from clipforge.data.text import read_text

__all__ = [
    "CaptionIndex",
    "CaptionSet",
    "CaptionedSource",
    "DataError",
    "DataURI",
    "ImageFiles",
    "ImageFolder",
    "ImageSource",
    "LabelledSource",
    "find_images",
    "open_data",
    "parse_data_uri",
    "read_captions",
    "read_text",
    "register_scheme",
    "scan_image_folder",
    "schemes",
]


@dataclass(frozen=True)
class DataURI:
    """A parsed data URI."""

    scheme: str  # a registered scheme, lower case
    location: str  # a path, or whatever the scheme reads after the colon
    options: dict[str, str] = field(default_factory=dict)  # from ``?key=value&...``

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.scheme}:{self.location}" + (f"?{query}" if query else "")


# scheme -> (what it gives, "module:function" of its opener); openers are imported on first use.
_SCHEMES: dict[str, tuple[str, str]] = {
    "imagefolder": (
        "class sub-folders of images (torchvision's ImageFolder layout)", "clipforge.data.imagefolder:open_imagefolder"
    ),
    "folder": ("any folder of images, searched recursively (no labels)", "clipforge.data.folder:open_folder"),
    "csv": ("a CSV/TSV file of image paths and captions", "clipforge.data.captions:open_csv"),
    "jsonl": ("a JSON Lines file of image paths and captions", "clipforge.data.captions:open_jsonl"),
    "pairs": ("a folder of name.jpg + name.txt caption files", "clipforge.data.pairs:open_pairs"),
    "shapes": ("built-in generated shapes with captions (no files)", "clipforge.data.shapes:open_shapes"),
    "digits": ("handwritten digits with captions (scikit-learn's bundled set)", "clipforge.data.digits:open_digits"),
    "shards": ("webdataset tar shards of images and captions, streamed", "clipforge.data.shards:open_shards"),
}


def register_scheme(scheme: str, description: str, opener: str | Callable[..., Any]) -> None:
    """Makes ``scheme:...`` URIs open with ``opener(location, **options)`` ("module:function" or a callable)."""
    if not scheme.isidentifier() or scheme.lower() != scheme:
        raise ValueError(f"a scheme is a lower-case identifier, got {scheme!r}")
    _SCHEMES[scheme] = (description, opener)  # type: ignore[assignment]


def schemes() -> dict[str, str]:
    """Registered schemes and what each gives."""
    return {name: description for name, (description, _) in _SCHEMES.items()}


def _known() -> str:
    return ", ".join(f"{name}:" for name in _SCHEMES)


def parse_data_uri(uri: str | DataURI) -> DataURI:
    """Splits ``scheme:location[?options]``; a DataError names the URI and the known schemes."""
    if isinstance(uri, DataURI):
        return uri
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() not in _SCHEMES:
        raise DataError(f"data URI {uri!r} does not start with a known scheme ({_known()}), e.g. imagefolder:DIR")
    location, _, query = rest.removeprefix("//").partition("?")  # an empty location is the opener's to judge
    try:
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True)) if query else {}
    except ValueError as err:
        raise DataError(f"data URI {uri!r}: options must read ?key=value&key=value") from err
    return DataURI(scheme.lower(), location, options)


def open_data(uri: str | DataURI, **options: Any) -> Any:
    """The data source a URI names; keyword ``options`` add to (and override) the URI's."""
    parsed = parse_data_uri(uri)
    opener = _SCHEMES[parsed.scheme][1]
    if isinstance(opener, str):
        module, _, name = opener.partition(":")
        opener = getattr(importlib.import_module(module), name)
    merged = {**parsed.options, **{k: v for k, v in options.items() if v is not None}}
    try:
        inspect.signature(opener).bind(parsed.location, **merged)
    except TypeError as err:
        raise DataError(f"data URI {str(parsed)!r}: {parsed.scheme}: does not take these options: {err}") from err
    return opener(parsed.location, **merged)
