"""``pairs:DIR`` — a folder of images, each with a caption file of the same name.

    photos/0001.jpg  photos/0001.txt      →   (image, "a dog on a beach")
    photos/sub/x.png photos/sub/x.txt

Files are found recursively and sorted by path, so indices are stable.  An image without
a ``.txt`` beside it is left out and counted (``missing_captions``); a caption file that is
not UTF-8, or is empty, surfaces when the sample is read (training skips and counts it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipforge.data._errors import DataError
from clipforge.data.imagefolder import IMAGE_EXTENSIONS
from clipforge.data.images import read_rgb

__all__ = ["CaptionedFolder", "open_pairs"]


@dataclass
class CaptionedFolder:
    """Image files and the caption files beside them; ``ds[k] -> (PIL.Image, caption)``."""

    root: Path
    images: list[Path]
    missing_captions: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str:
        """The caption of sample ``index``; UnicodeDecodeError when it is not UTF-8."""
        return self.images[index].with_suffix(".txt").read_bytes().decode("utf-8").strip()

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return read_rgb(self.images[index]), self.caption(index)


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
