"""``folder:DIR`` — any folder of images, searched recursively: no labels, no captions.

    photos/IMG_0001.jpg, photos/2023/beach.png, photos/2023/notes.txt   →   2 images

A file is an image by its extension (`IMAGE_EXTENSIONS`, any case); other files are passed
over without a word.  Names starting with a dot — files and folders — are passed over too: they
are hidden (``.thumbnails/``, ``.git/``), and macOS writes ``._IMG_0001.jpg`` resource files
beside copied photos that carry an image's extension and are not images.  Links are followed,
each folder once, so a link back up the tree does not loop.  Files are sorted by their path
below ``DIR``, so indices are stable.  A file with an image's extension that is corrupt,
truncated or not an image at all is found here and skipped, counted and listed when read
(`clipforge.data.images.ImageLoader`).

`ImageFiles` is an `ImageSource`: ``clipforge index build --data folder:DIR`` indexes it, and
``clipforge rerank --images DIR`` ranks it.  For class sub-folders with labels use
``imagefolder:``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from clipforge.data._errors import DataError
from clipforge.data.imagefolder import IMAGE_EXTENSIONS
from clipforge.data.images import ImageLoader
from clipforge.data.protocols import first_n

__all__ = ["ImageFiles", "find_images", "open_folder"]


@dataclass
class ImageFiles:
    """Image files under a folder (an `ImageSource`)."""

    root: Path
    paths: list[Path]  # image k is paths[k]; `find_images` sorts them by their path below root
    name: str = ""  # how messages name the source; "folder:ROOT" when empty

    def __post_init__(self) -> None:
        self.name = self.name or f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.paths)

    def relative(self, index: int) -> str:
        """Image ``index``'s path below the root, with ``/`` separators: how commands name it."""
        return self.paths[index].relative_to(self.root).as_posix()

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, unreadable files skipped (see `ImageLoader`)."""
        paths = self.paths[: first_n(len(self), limit)]
        return ImageLoader(paths, transform, batch_size=batch_size, num_workers=num_workers, source=self.name)


def _walk(root: Path, extensions: Sequence[str]) -> list[Path]:
    seen: set[str] = set()
    found: list[Path] = []
    for folder, folders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # reached again through a link: its files are listed already
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # a fixed order: which
        # of two ways to one folder (a link and its target) counts is the same on every run
        found += [Path(folder) / name for name in files
                  if not name.startswith(".") and name.lower().endswith(extensions)]
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def find_images(root: str | os.PathLike[str], *, name: str = "",
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> ImageFiles:
    """The image files under ``root`` (module notes); a DataError when it is not a folder or
    holds none.  ``name`` is how messages name the source (default ``folder:ROOT``)."""
    root = Path(root).expanduser()
    name = name or f"folder:{root}"
    if not root.is_dir():
        raise DataError(f"{name}: not a folder" if root.exists() else f"{name}: no such folder")
    paths = _walk(root, tuple(e.lower() for e in extensions))
    if not paths:
        raise DataError(f"{name}: no image files ({' '.join(extensions)}) in it or its sub-folders")
    return ImageFiles(root, paths, name)


def open_folder(location: str) -> ImageFiles:
    """Opener of ``folder:DIR`` URIs (see `clipforge.data.open_data`)."""
    if not location:
        raise DataError("folder: needs a folder, e.g. folder:photos/")
    return find_images(location)
