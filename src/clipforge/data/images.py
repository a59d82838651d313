"""Reading image files for a model: Pillow decodes, unreadable files are skipped and recorded.

A file is unreadable when it is missing, is not an image Pillow recognises, or is corrupt or
truncated (``convert("RGB")`` decodes the whole file, so a truncated one fails there; Pillow's
``LOAD_TRUNCATED_IMAGES`` is left off).  Errors raised by the transform are not caught: they are
bugs, not bad data.  `ImageLoader` also serves generated images (``read`` draws item k), where
nothing is unreadable and every error is a bug (``read_errors=()``).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from clipforge.data._errors import DataError

__all__ = [
    "READ_ERRORS", "STOP_SIGNALS", "ImageLoader", "Skipped", "describe_skipped", "ignore_stop_signals",
    "quiet_abandoned_handover", "read_rgb",
    "skip_reason",
]

# Decoding failures that mean "bad data"; Pillow raises OSError for truncated or corrupt files.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# The signals that ask a run to stop (`clipforge.train.interrupt`): Ctrl-C, a scheduler's SIGTERM,
# SLURM's advance warning (SIGUSR1, which Windows lacks).
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                                      if hasattr(signal, name))


def ignore_stop_signals(worker_id: int) -> None:
    """A loader's ``worker_init_fn``: the worker ignores `STOP_SIGNALS`.  A terminal's Ctrl-C reaches
    the whole process group; the main process handles it (a training run stops after its step,
    an evaluation ends) and shuts its workers down itself.  A main process stopped at once (a
    second Ctrl-C) may drop a batch's shared-memory handle half-received: the worker's thread
    that hands it over then fails, and says nothing (`quiet_abandoned_handover`)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.excepthook = quiet_abandoned_handover


_HANDOVER_ERRORS = (EOFError, ConnectionError)


def quiet_abandoned_handover(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """A loader worker's ``sys.excepthook``: silent for the connection error of a file-descriptor
    handover (multiprocessing's resource sharer) that the main process abandoned; any other error
    is printed as Python prints it."""
    frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(trace)]
    if issubclass(kind, _HANDOVER_ERRORS) and frames and frames[0] == "_serve":
        return
    sys.__excepthook__(kind, error, trace)


@dataclass(frozen=True)
class Skipped:
    """An image file that could not be read, and why."""

    path: str
    reason: str


def read_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image at ``path`` fully decoded, in RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def skip_reason(err: BaseException) -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can identify"
    return f"{type(err).__name__}: {err}"


class _Images(Dataset):
    def __init__(
        self,
        items: Sequence[Any],
        transform: Callable[[Image.Image], Tensor],
        read: Callable[[Any], Image.Image],
        read_errors: tuple[type[BaseException], ...],
    ) -> None:
        self.items, self.transform, self.read, self.read_errors = items, transform, read, read_errors

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, Skipped | None]:
        item = self.items[index]
        try:
            image = self.read(item)
        except self.read_errors as err:
            return index, None, Skipped(str(item), skip_reason(err))
        return index, self.transform(image), None


def _collate(items: list[tuple[int, Tensor | None, Skipped | None]]) -> tuple[list[int], Tensor | None, list[Skipped]]:
    kept = [(i, image) for i, image, _ in items if image is not None]
    skipped = [skip for _, _, skip in items if skip is not None]
    batch = torch.stack([image for _, image in kept]) if kept else None
    return [i for i, _ in kept], batch, skipped


def describe_skipped(skipped: Sequence[Skipped], *, shown: int = 3) -> str:
    """"N unreadable image(s), e.g. a.jpg (file not found), ..." for messages and reports."""
    examples = ", ".join(f"{os.path.basename(s.path)} ({s.reason})" for s in skipped[:shown])
    return f"{len(skipped)} unreadable image(s), e.g. {examples}" if skipped else "no unreadable image"


class ImageLoader:
    """Batches [B, 3, H, W] of the readable images among ``paths``, in order.

    After a full pass, ``kept`` lists the indices (into ``paths``) of the images yielded and
    ``skipped`` the unreadable files.  A pass that finds no readable image raises a DataError
    naming ``source``.  ``len()`` is the number of paths, for progress bars.  A pass leaves
    torch's global random state as it was: the loader draws its worker seeds from a generator of
    its own, so evaluating in the middle of a training run does not change the run.

    Args:
        paths: image files, or whatever ``read`` takes (item indices of a generated source).
        transform: PIL image -> tensor [3, H, W], e.g. the ``preprocess`` of `clipforge.checkpoints.load`.
        batch_size: images per batch.
        num_workers: decoding processes (0 decodes in this one), as in `torch.utils.data.DataLoader`;
            ``read`` and ``transform`` must then be picklable.
        source: how messages name the data, e.g. "imagefolder:val/".
        read: an item of ``paths`` -> PIL image; `read_rgb` by default.
        read_errors: the errors of ``read`` that mean an unreadable item, skipped and recorded;
            any other error propagates.
    """

    def __init__(
        self,
        paths: Sequence[Any],
        transform: Callable[[Image.Image], Tensor],
        *,
        batch_size: int = 256,
        num_workers: int = 0,
        source: str = "images",
        read: Callable[[Any], Image.Image] = read_rgb,
        read_errors: tuple[type[BaseException], ...] = READ_ERRORS,
    ) -> None:
        self.paths, self.transform = list(paths), transform
        self.batch_size, self.num_workers, self.source = batch_size, num_workers, source
        self.read, self.read_errors = read, read_errors
        self.kept: list[int] = []
        self.skipped: list[Skipped] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[Tensor]:
        self.kept, self.skipped = [], []
        if not self.paths:
            raise DataError(f"{self.source}: no image files")
        loader: Any = DataLoader(
            _Images(self.paths, self.transform, self.read, self.read_errors),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate,
            generator=torch.Generator(),  # DataLoader would otherwise draw its base seed from the global one
            worker_init_fn=ignore_stop_signals,
        )
        for indices, batch, skipped in loader:
            self.kept += indices
            self.skipped += skipped
            if batch is not None:
                yield batch
        if not self.kept:
            raise DataError(
                f"{self.source}: none of the {len(self.paths)} images could be read; {describe_skipped(self.skipped)}"
            )
