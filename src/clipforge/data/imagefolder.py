"""A folder of labelled images in torchvision's ImageFolder layout: one sub-folder per class.

    val/cat/001.jpg, val/cat/more/002.png, val/dog/003.jpg   →   classes ["cat", "dog"]

Class names are the sub-folder names sorted, indices follow that order, and files are found
as torchvision's ``make_dataset`` finds them (recursively, links followed, sorted, known image
extensions in any case), so indices agree with a torchvision ``ImageFolder`` of the same folder.
A class folder without images stays a class (it takes part in zero-shot classification).
An `ImageFolder` is a `LabelledSource`: the class names are the folder names, and it has no
prompts of its own (zero-shot evaluation then uses the caller's, or the shipped ``default`` set).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from PIL import Image
from torch import Tensor

from clipforge.data._errors import DataError
from clipforge.data.images import ImageLoader
from clipforge.data.protocols import first_n

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "open_imagefolder", "scan_image_folder"]

# torchvision.datasets.folder.IMG_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolder:
    """Image files with class labels."""

    root: Path
    classes: list[str]  # sorted sub-folder names; a label is an index into this list
    samples: list[tuple[Path, int]]  # (image file, label), in torchvision's order

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    # No prompts of its own: zero-shot evaluation takes the caller's templates.
    templates: ClassVar[None] = None

    @property
    def classnames(self) -> list[str]:
        """The class names: the sub-folder names, in label order."""
        return list(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, index: int) -> int:
        return self.samples[index][1]

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
        return ImageLoader(
            paths, transform, batch_size=batch_size, num_workers=num_workers, source=f"imagefolder:{self.root}"
        )


def scan_image_folder(root: str | os.PathLike[str], *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> ImageFolder:
    """Lists the classes and image files under ``root``; a DataError if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: not a folder")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DataError(f"imagefolder:{root}: no class sub-folders (expected {root}/<class>/<image>); "
                        f"for an unlabelled folder of images use folder:{root}")
    lowered = tuple(e.lower() for e in extensions)
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(Path(folder) / f, label) for f in sorted(files) if f.lower().endswith(lowered)]
    if not samples:
        raise DataError(
            f"imagefolder:{root}: no image files ({', '.join(extensions)}) in its {len(classes)} class folder(s)"
        )
    return ImageFolder(root, classes, samples)


def open_imagefolder(location: str) -> ImageFolder:
    """Opener of ``imagefolder:DIR`` URIs."""
    if not location:
        raise DataError("imagefolder: needs a folder, e.g. imagefolder:val/")
    return scan_image_folder(location)
