"""``pairs:DIR`` — a folder of images, each with a caption file of the same name.

    photos/0001.jpg  photos/0001.txt      →   (image, "a dog on a beach")
    photos/sub/x.png photos/sub/x.txt

Files are found recursively and sorted by path, so indices are stable.  An image without
a ``.txt`` beside it is left out and counted (``missing_captions``).  Caption files are read
when a sample is: one that is not UTF-8 (or vanished) raises a DataError naming the file,
line and byte (`clipforge.data.text.read_text`); the trainer counts that sample as bad, as it
counts an unreadable image, and evaluation stops on it, as on any bad line of a caption file.

A `CaptionedFolder` is a `CaptionedSource`: in retrieval evaluation an image whose caption file
is empty stays as a distractor without a caption, and the caption is counted as skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor

from clipforge.data._errors import DataError
from clipforge.data.imagefolder import IMAGE_EXTENSIONS
from clipforge.data.images import ImageLoader, read_rgb
from clipforge.data.protocols import CaptionIndex, first_n
from clipforge.data.text import read_text

__all__ = ["CaptionedFolder", "open_pairs"]


@dataclass
class CaptionedFolder:
    """Image files and the caption files beside them; ``ds[k] -> (PIL.Image, caption)``."""

    root: Path
    image_paths: list[Path]  # images with a caption file beside them, sorted by path
    missing_captions: int = 0  # images left out for having none

    def __len__(self) -> int:
        return len(self.image_paths)

    def caption(self, index: int) -> str:
        """The caption of sample ``index``, stripped ("" for an empty file); a DataError naming the
        file when it is not UTF-8 or cannot be read."""
        return read_text(self.image_paths[index].with_suffix(".txt"), what="caption file", allow_empty=True).strip()

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return read_rgb(self.image_paths[index]), self.caption(index)

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, unreadable files skipped (see `ImageLoader`)."""
        paths = self.image_paths[: first_n(len(self), limit)]
        source = f"pairs:{self.root}"
        return ImageLoader(paths, transform, batch_size=batch_size, num_workers=num_workers, source=source)

    def caption_index(self, limit: int | None = None) -> CaptionIndex:
        """One caption per image of the first ``limit``; empty ones are skipped and counted, and a
        caption file that is not UTF-8 is a DataError naming it."""
        captions, owners, skipped = [], [], 0
        for k in range(first_n(len(self), limit)):
            text = self.caption(k)
            if text:
                captions.append(text)
                owners.append(k)
            else:
                skipped += 1
        return CaptionIndex(captions, owners, skipped)


def open_pairs(location: str) -> CaptionedFolder:
    """Opener of ``pairs:DIR`` URIs (see `clipforge.data.open_data`)."""
    root = Path(location).expanduser()
    if not root.is_dir():
        raise DataError(f"pairs:{location}: not a directory")
    images, missing = [], 0
    for folder, _, files in sorted(os.walk(root, followlinks=True)):
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if path.with_suffix(".txt").is_file():
                images.append(path)
            else:
                missing += 1
    if not images:
        raise DataError(f"pairs:{location}: no image with a caption file beside it (name.jpg + name.txt)"
                        + (f"; {missing} image(s) lack one" if missing else ""))
    return CaptionedFolder(root, images, missing)
