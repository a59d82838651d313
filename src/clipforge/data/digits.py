"""``digits://`` — real handwritten digits with captions.

The images are scikit-learn's bundled copy of the UCI optical-recognition digits (1,797
scans of 8×8 pixels, 16 grey levels, written by 43 people), upsampled with bicubic
interpolation to ``size`` pixels (default 64) and turned to RGB.  Captions vary the wording
("a handwritten seven", "the digit 7", "a scan of a hand-written number seven").

The split is fixed: a seeded permutation (seed 1797) puts 1,438 images (80 %) in ``train``
and 359 in ``test``, the same on every machine.  ``label(k)`` is the digit.

URI form: ``digits://?split=train&size=64`` (both optional).

Evaluation: both splits are a `LabelledSource` (zero-shot classification over the ten digit
names, with the prompts in `DigitsDataset.templates`) and a `CaptionedSource` (retrieval).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image
from torch import Tensor

from clipforge.data.images import ImageLoader
from clipforge.data.protocols import CaptionIndex, first_n

__all__ = ["DigitsDataset", "open_digits", "DIGIT_WORDS", "class_names"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPLIT_SEED = 1797
_TRAIN_FRACTION = 0.8

_TEMPLATES = (
    "a handwritten {w}",
    "the digit {d}",
    "a photo of the number {w}",
    "a scan of a hand-written number {w}",
    "the number {d}, written by hand",
    "a {w}",
    "handwriting: {d}",
    "a blurry handwritten digit {w}",
)


def class_names() -> list[str]:
    """The ten zero-shot classes: "zero" … "nine"."""
    return list(DIGIT_WORDS)


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a declared dependency
        raise ImportError("digits:// needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    return bunch.images, bunch.target


class DigitsDataset:
    """``ds[k] -> (PIL.Image, caption)`` over the fixed ``train`` or ``test`` split."""

    def __init__(self, *, split: str = "train", size: int = 64, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
        if size < 8:
            raise ValueError(f"digits image size must be at least 8 pixels, got {size}")
        images, targets = _load()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
        cut = int(round(_TRAIN_FRACTION * len(images)))
        idx = order[:cut] if split == "train" else order[cut:]
        self.split, self.size, self.seed = split, size, seed
        self._images = images[idx]  # (n, 8, 8) float64 in [0, 16]
        self._targets = targets[idx]

    def __len__(self) -> int:
        return len(self._targets)

    def image(self, index: int) -> Image.Image:
        grey = (self._images[index] * (255.0 / 16.0)).round().astype(np.uint8)  # (8, 8)
        img = Image.fromarray(255 - grey, mode="L")  # dark ink on a light page
        return img.resize((self.size, self.size), Image.BICUBIC).convert("RGB")

    def caption(self, index: int) -> str:
        digit = int(self._targets[index])
        rng = random.Random(f"digits/{self.seed}/{self.split}/{index}")
        return rng.choice(_TEMPLATES).format(w=DIGIT_WORDS[digit], d=digit)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} digits")
        return self.image(index), self.caption(index)

    @property
    def classnames(self) -> list[str]:
        return class_names()

    # Zero-shot prompts ("{c}" is the digit's name).
    templates = ("a handwritten {c}", "a photo of the number {c}", "a scan of a hand-written number {c}", "a {c}")

    def label(self, index: int) -> int:
        return int(self._targets[index])

    def labels(self) -> np.ndarray:
        return self._targets.copy()

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches."""
        return ImageLoader(range(first_n(len(self), limit)), transform, batch_size=batch_size, num_workers=num_workers,
                           source=f"digits://?split={self.split}", read=self.image, read_errors=())

    def caption_index(self, limit: int | None = None) -> CaptionIndex:
        """The caption of each of the first ``limit`` images (all when None): one per image."""
        n = first_n(len(self), limit)
        return CaptionIndex([self.caption(k) for k in range(n)], list(range(n)))


def open_digits(
    location: str = "", *, split: str = "train", size: str | int = 64, seed: str | int = 0
) -> DigitsDataset:
    """Opener of ``digits://?split=…&size=…`` URIs (see `clipforge.data.open_data`)."""
    if location.strip("/"):
        raise ValueError(f"digits:// takes no location, only options (got {location!r})")
    try:
        return DigitsDataset(split=split, size=int(size), seed=int(seed))
    except ValueError as e:
        raise ValueError(f"digits://: {e}") from None
