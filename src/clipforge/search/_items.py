"""The images of any data source as indexable items: a stable key, a file path if there is
one, a caption if there is one, and the image itself, decoded with unreadable ones skipped.

| source | key | path | caption |
|---|---|---|---|
| `ImageFiles` (``folder:``) | the file path | the file | none |
| `ImageFolder` (``imagefolder:``) | the file path | the file | none (the class is in the path) |
| `CaptionSet` (``csv:``, ``jsonl:``) | the file path | the file | the image's first caption |
| `CaptionedFolder` (``pairs:``) | the file path | the file | its ``.txt`` |
| other map-style sources, ``s[i] -> (image, caption)`` (``shapes:``, ``digits:``) | ``URI#i`` | none | ``s[i]``'s |
| undecoded records, ``samples()`` (``shards:``) | the record's ``name`` (``url#key``) | none | ``caption()`` |
| iterables of ``(image, caption)``, or of dicts | ``key`` or ``URI#i`` | ``path`` | ``caption`` |

The dicts hold ``image`` and optionally ``caption``, ``key`` and ``path``.  A source can also say for
itself how it is indexed with a method ``index_items()`` returning
an iterable of `Item` whose ``load`` reads the image.  Keys must be stable from one pass to
the next: an interrupted build resumes by skipping the keys already embedded, and ``index
add`` adds only keys not yet in the index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipforge.data.images import READ_ERRORS, Skipped, read_rgb, skip_reason

__all__ = ["Decoded", "Item", "decoded_batches", "items_of"]


@dataclass(frozen=True)
class Item:
    """One image of a collection, before it is read."""

    key: str  # unique and stable within the collection
    path: str | None = None  # the image file, when there is one (the server shows it)
    caption: str | None = None
    load: Callable[[], Image.Image] | None = None  # reads the image; None: read_rgb(path)

    def image(self) -> Image.Image:
        return self.load() if self.load is not None else read_rgb(self.path)  # type: ignore[arg-type]


@dataclass
class Decoded:
    """An item after reading: its model input and pixel size, or why it was skipped."""

    item: Item
    pixels: Tensor | None  # [3, H, W] after preprocessing
    size: tuple[int, int] | None  # (width, height) of the image as stored
    file_bytes: int | None
    skipped: Skipped | None


def _file_items(paths: Iterable[os.PathLike[str] | str], captions: Iterable[str | None]) -> list[Item]:
    return [Item(os.path.abspath(p), os.path.abspath(p), c) for p, c in zip(paths, captions)]


def _first_captions(source: Any) -> list[str | None]:
    first: dict[int, str] = {}
    for caption, image in zip(source.captions, source.text_to_image):
        first.setdefault(image, caption)
    return [first.get(i) for i in range(len(source.image_paths))]


def _caption_or_none(source: Any, index: int) -> str | None:
    # a caption file that cannot be read (not UTF-8) is a DataError naming it, fatal as any bad
    # text input is: indexing the image without it would store a gap nobody is told about
    return source.caption(index).strip() or None


def _map_item(source: Any, uri: str, index: int) -> Item:
    def load() -> Image.Image:
        image = source[index]
        image = image[0] if isinstance(image, (tuple, list)) else image
        return image.convert("RGB")

    caption = _caption_or_none(source, index) if hasattr(source, "caption") else None
    return Item(f"{uri}#{index}", None, caption, load)


def _record_item(record: Any, uri: str, index: int) -> Item:
    if isinstance(record, dict):
        image, caption = record.get("image"), record.get("caption")
        path = record.get("path")
        key = str(record.get("key") or (os.path.abspath(path) if path else f"{uri}#{index}"))
    else:
        fields = tuple(record) if isinstance(record, (tuple, list)) else (record,)
        image, caption, path = fields[0], fields[1] if len(fields) > 1 else None, None
        key = f"{uri}#{index}"
    if image is None and path is None:
        raise ValueError(f"{uri}: record {index} has neither an image nor a path")
    load = None if image is None else (lambda im=image: im.convert("RGB"))
    return Item(key, os.path.abspath(path) if path else None, caption if isinstance(caption, str) else None, load)


def _sample_item(record: Any) -> Item:
    """An undecoded stream record (a shard sample): decoded only if its key is not indexed yet."""
    try:
        caption = record.caption() if getattr(record, "error", None) is None else None
    except (ValueError, UnicodeDecodeError):
        caption = None
    return Item(record.name, None, caption or None, lambda: record.decode()[0])


def items_of(source: Any, uri: str) -> Iterable[Item]:
    """The items of a data source (see the module notes); a list when the source has a length."""
    from clipforge.data import CaptionSet, ImageFiles, ImageFolder
    from clipforge.data.pairs import CaptionedFolder

    if hasattr(source, "index_items"):
        return source.index_items()
    if isinstance(source, (ImageFiles, ImageFolder)):
        return _file_items(source.paths, [None] * len(source))
    if isinstance(source, CaptionSet):
        return _file_items(source.image_paths, _first_captions(source))
    if isinstance(source, CaptionedFolder):
        return [
            Item(os.path.abspath(p), os.path.abspath(p), _caption_or_none(source, i))
            for i, p in enumerate(source.image_paths)
        ]
    if getattr(source, "streaming", False) and hasattr(source, "samples"):
        return (_sample_item(record) for record in source.samples())
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return [_map_item(source, uri, i) for i in range(len(source))]
    if hasattr(source, "__iter__"):
        return (_record_item(record, uri, i) for i, record in enumerate(source))
    raise TypeError(f"{uri}: a {type(source).__name__} is neither map-style nor iterable; it cannot be indexed")


def _decode(item: Item, transform: Callable[[Image.Image], Tensor]) -> Decoded:
    try:
        image = item.image()
    except READ_ERRORS as err:
        return Decoded(item, None, None, None, Skipped(item.path or item.key, skip_reason(err)))
    size = None
    if item.path is not None:
        try:
            size = os.path.getsize(item.path)
        except OSError:
            pass
    return Decoded(item, transform(image), image.size, size, None)


class _ItemImages(Dataset):
    def __init__(self, items: list[Item], transform: Callable[[Image.Image], Tensor]) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Decoded:
        return _decode(self.items[index], self.transform)


def _as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def decoded_batches(
    items: Iterable[Item],
    transform: Callable[[Image.Image], Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[list[Decoded]]:
    """Batches of decoded items, in order: a list is read by ``num_workers`` processes, any
    other iterable in this process."""
    if isinstance(items, list):
        if not items:
            return
        loader: Any = DataLoader(
            _ItemImages(items, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_as_list,
        )
        yield from loader
        return
    pending: list[Decoded] = []
    for item in items:
        pending.append(_decode(item, transform))
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending
