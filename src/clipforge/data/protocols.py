"""The kinds of image source: labelled images and captioned images (what evaluation takes),
and plain image files (what an index, ``score`` and ``rerank`` can take).

    from clipforge.data import CaptionedSource, LabelledSource, open_data

    source = open_data("shapes://?split=heldout")
    isinstance(source, LabelledSource)      # True: zero-shot classification can run on it
    loader = source.images(preprocess, batch_size=256, limit=512)   # the first 512 images
    labels = [source.label(k) for k in range(len(source))]

`clipforge.evaluate` runs zero-shot classification on a `LabelledSource` and retrieval on a
`CaptionedSource`; both ``clipforge eval`` and the trainer's periodic evaluation go through it.

| source | labelled | captioned |
|---|---|---|
| ``folder:DIR`` (`ImageFiles`) | no | no: an `ImageSource` only |
| ``imagefolder:DIR`` (`ImageFolder`) | yes: the folder names are the classes | no |
| ``csv:FILE``, ``jsonl:FILE`` (`CaptionSet`) | no | yes: several captions per image |
| ``pairs:DIR`` (`CaptionedFolder`) | no | yes: one caption per image |
| ``shapes://`` (`ShapesDataset`) | splits ``seen`` and ``heldout`` | yes |
| ``digits://`` (`DigitsDataset`) | yes | yes |
| ``shards:`` (`ShardSource`) | no: streamed | no: streamed |

A streamed source has no first N images to come back to, so it is no evaluation source.
An `ImageSource` is image files and nothing else: ``folder:`` gives one, and ``imagefolder:``
is one too.
``limit`` always means the first ``limit`` images in the source's order; the captions of a
caption file follow their images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from clipforge.data.images import ImageLoader
    from clipforge.zeroshot import Templates

__all__ = ["CaptionIndex", "CaptionedSource", "ImageSource", "LabelledSource", "first_n"]


def first_n(size: int, limit: int | None) -> int:
    """How many of ``size`` items the first ``limit`` are (all when ``limit`` is None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images or None, got {limit}")
    return size if limit is None else min(size, limit)


class CaptionIndex(NamedTuple):
    """Captions and the image each describes."""

    captions: list[str]
    text_to_image: list[int]  # caption j describes image text_to_image[j] (an index into the source's images)
    skipped: int = 0  # captions left out for being empty


@runtime_checkable
class LabelledSource(Protocol):
    """Images with class labels: what zero-shot classification evaluates."""

    @property
    def classnames(self) -> Sequence[str]:
        """Class names in label order: label k is ``classnames[k]``."""
        ...

    @property
    def templates(self) -> Templates | None:
        """Prompts written for this data (``"{c}"`` is the class name); None when it has none."""
        ...

    def __len__(self) -> int:
        """The number of images."""
        ...

    def label(self, index: int) -> int:
        """The class of image ``index``; a DataError when the source has no labels (e.g. a training split)."""
        ...

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, unreadable files skipped; the
        loader's ``kept`` holds image indices."""
        ...


@runtime_checkable
class CaptionedSource(Protocol):
    """Images and captions that describe them: what retrieval evaluates."""

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` distinct images (all when None) as batches, unreadable files skipped."""
        ...

    def caption_index(self, limit: int | None = None) -> CaptionIndex:
        """The captions of the first ``limit`` images (all when None), in the source's order."""
        ...


@runtime_checkable
class ImageSource(Protocol):
    """Image files, without labels or captions: what an index, ``score`` and ``rerank`` read."""

    @property
    def paths(self) -> Sequence[os.PathLike[str]]:
        """The image files, in the source's order: image ``k`` of `images` is ``paths[k]``."""
        ...

    def __len__(self) -> int:
        """The number of image files."""
        ...

    def images(
        self,
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> ImageLoader:
        """The first ``limit`` images (all when None) as batches, unreadable files skipped; the
        loader's ``kept`` holds indices into ``paths``."""
        ...
