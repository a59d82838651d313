"""Deterministic training batches from any map-style image–caption source.

The sample order is a pure function of (seed, step): positions run through the data set
epoch after epoch, each epoch in its own seeded permutation, and optimiser step k takes
positions [k·B, (k+1)·B).  A run resumed at step k therefore reads exactly the samples an
uninterrupted run would, with no loader state to save.  With W ranks and K micro-batches
per step, rank r reads its contiguous share of the global batch, cut into K micro-batches,
so the ranks' rows concatenated in rank order are the single-process batch.

Bad samples — unreadable or truncated images, missing files, empty or non-UTF-8 captions —
are skipped and counted; `BatchStream.check_bad` stops the run with a DataError naming
examples once more than a set fraction of what was read is bad.  Only reading and decoding
a sample can make it bad: an error raised by the transform is a bug and propagates.

Rows of a caption file that show the same image carry that image's index
(`MicroBatch.groups`, from `image_groups`), which the loss takes as group labels.

Loader workers ignore the signals that stop a run (`STOP_SIGNALS`): a terminal's Ctrl-C and a
scheduler's SIGTERM reach the whole process group, and a worker they killed would end the run
with an error before it could finish its step and save; the run shuts its workers down itself.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from clipforge.data._errors import DataError
from clipforge.data.captions import CaptionSet
from clipforge.data.images import READ_ERRORS, STOP_SIGNALS, ignore_stop_signals

__all__ = ["STOP_SIGNALS", "BatchPlan", "BatchStream", "Bad", "MicroBatch", "StreamBatchStream", "image_groups"]


@dataclass(frozen=True)
class Bad:
    """A sample that was skipped, and why."""

    index: int
    reason: str


def _micro_size(batch_size: int, world: int, accum: int) -> int:
    """Rows per micro-batch: ``batch_size`` split over ``world`` ranks and ``accum`` micro-batches each."""
    if batch_size % (world * accum):
        raise ValueError(f"batch_size={batch_size} must be divisible by world size {world} × accum_steps {accum}")
    return batch_size // (world * accum)


class BatchPlan:
    """Which data set indices each optimiser step reads."""

    def __init__(self, size: int, *, batch_size: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1) -> None:
        if size < 1:
            raise DataError("the training data set is empty")
        _micro_size(batch_size, world, accum)
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.accum = rank, world, accum
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Data set indices of step ``step``'s whole batch, all ranks, in rank order."""
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(pos, self.size)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's K micro-batches of step ``step``."""
        per_rank = self.batch_size // self.world
        mine = self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_micro = per_rank // self.accum
        return [mine[k * per_micro : (k + 1) * per_micro] for k in range(self.accum)]

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.size


# What reading and decoding a sample raise for bad data (a non-UTF-8 caption is a ValueError).
# Errors raised by the transform are bugs, not bad data: they are not caught.
_BAD_DATA = READ_ERRORS


class _Prepare:
    """(image, caption) -> (index, image tensor, caption), or a `Bad` record: never raises for bad data.

    ``noise``: per-channel standard deviations (in the units of the preprocessed tensor) of
    Gaussian noise added to each image; empty for none.
    """

    def __init__(self, preprocess: Callable, *, seed: int, augment: bool, noise: tuple[float, ...] = ()) -> None:
        self.preprocess, self.seed, self.augment = preprocess, seed, augment
        self.noise = torch.tensor(noise, dtype=torch.float32)[:, None, None] if noise else None

    def _generator(self, key: str) -> torch.Generator:
        """A generator seeded by ``key``: the same draws for the same (seed, step, index) on resume."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def __call__(self, fetch: Callable[[], tuple[Any, Any]], index: int, step: int,
                 name: str = "") -> tuple[int, Tensor, str] | Bad:
        where = f"{name}: " if name else ""
        try:
            image, caption = fetch()
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8")
            if isinstance(image, Image.Image):
                image.load()  # a lazily opened image decodes here, not inside the transform
        except _BAD_DATA as err:
            return Bad(index, f"{where}{type(err).__name__}: {err}"[:300])
        caption = caption.strip()
        if not caption:
            return Bad(index, f"{where}empty caption")
        if self.augment:
            pixels = self.preprocess(image, generator=self._generator(f"{self.seed}/{step}/{index}"))
        else:
            pixels = self.preprocess(image)
        if self.noise is not None:
            draw = torch.randn(pixels.shape, generator=self._generator(f"{self.seed}/{step}/{index}/noise"))
            pixels = pixels + draw.to(pixels.dtype) * self.noise.to(pixels.dtype)
        return index, pixels, caption


class _Samples(Dataset):
    """(index, step) -> (index, image tensor, caption) or a `Bad` record, from a map-style source."""

    def __init__(self, source: Any, prepare: _Prepare) -> None:
        self.source, self.prepare = source, prepare

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Tensor, str] | Bad:
        index, step = key
        return self.prepare(lambda: self.source[index], index, step)


@dataclass
class MicroBatch:
    images: Tensor  # [b, 3, H, W]
    tokens: Tensor  # [b, L]
    indices: list[int]  # the data set index of each row
    bad: list[Bad] = field(default_factory=list)
    groups: Tensor | None = None  # [b] the image each row shows (`image_groups`); None: each row its own

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device) -> MicroBatch:
        """The tensors on ``device``."""
        groups = None if self.groups is None else self.groups.to(device)
        return replace(self, images=self.images.to(device, non_blocking=True), tokens=self.tokens.to(device),
                       groups=groups)


def image_groups(source: Any) -> Tensor | None:
    """For each item of ``source``, the index of the image it shows, when items share images (a
    caption file with several captions per image, as COCO has); None when every item is its
    own image.  Training passes these as the loss's labels, so that two captions of one image
    in a batch are positives of each other, not negatives."""
    if isinstance(source, CaptionSet) and len(source.image_paths) < len(source.captions):
        return torch.tensor(source.text_to_image, dtype=torch.long)
    return None


class _Collate:
    def __init__(self, tokenizer: Callable[[list[str]], Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[tuple[int, Tensor, str] | Bad]) -> MicroBatch:
        good = [x for x in items if not isinstance(x, Bad)]
        bad = [x for x in items if isinstance(x, Bad)]
        if not good:
            return MicroBatch(torch.empty(0), torch.empty(0, dtype=torch.long), [], bad)
        return MicroBatch(
            torch.stack([p for _, p, _ in good]),
            self.tokenizer([c for _, _, c in good]),
            [i for i, _, _ in good],
            bad,
        )


class BatchStream:
    """Micro-batches for steps ``start .. stop-1``, loaded by ``workers`` processes.

    Iterating yields, per step, this rank's list of K `MicroBatch` es.
    """

    def __init__(
        self,
        source: Any,
        plan: BatchPlan,
        *,
        preprocess: Callable,
        tokenizer: Callable[[list[str]], Tensor],
        augment: bool = False,
        noise: tuple[float, ...] = (),
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        source_name: str = "data",
    ) -> None:
        self.plan = plan
        self._setup(preprocess, tokenizer, seed=plan.seed, accum=plan.accum, augment=augment, noise=noise,
                    workers=workers, max_bad_fraction=max_bad_fraction, source_name=source_name)
        self.samples = _Samples(source, self.prepare)
        self.groups = image_groups(source)

    def _setup(self, preprocess: Callable, tokenizer: Callable[[list[str]], Tensor], *, seed: int, accum: int,
               augment: bool, noise: tuple[float, ...], workers: int, max_bad_fraction: float,
               source_name: str) -> None:
        """What both streams share: sample preparation, collation, loading and bad-sample counting."""
        self.seed, self.accum, self.workers = seed, accum, workers
        self.prepare = _Prepare(preprocess, seed=seed, augment=augment, noise=noise)
        self.collate = _Collate(tokenizer)
        self.max_bad_fraction, self.source_name = max_bad_fraction, source_name
        self.seen = 0  # samples read, bad ones included
        self.bad: list[Bad] = []  # the first 20 bad samples, for messages
        self.bad_count = 0
        self.groups: Tensor | None = None  # `image_groups` of the source

    def epoch(self, step: int) -> float | None:
        """Epochs read by the end of ``step`` steps."""
        return self.plan.epoch(step)

    def steps(self, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        if stop <= start:
            return
        group: list[MicroBatch] = []
        for micro in self._micro_batches(start, stop):
            self._count(micro)
            if self.groups is not None:
                micro.groups = self.groups[torch.tensor(micro.indices, dtype=torch.long)]
            group.append(micro)
            if len(group) == self.accum:
                yield group
                group = []

    def _micro_batches(self, start: int, stop: int) -> Iterable[MicroBatch]:
        """This rank's micro-batches of steps ``start .. stop-1``, in order."""
        keys = [[(i, step) for i in micro] for step in range(start, stop) for micro in self.plan.micro_batches(step)]
        return self._loader(self.samples, batch_sampler=keys, collate_fn=self.collate)

    def _loader(self, dataset: Dataset, **options: Any) -> DataLoader:
        return DataLoader(
            dataset, num_workers=self.workers, persistent_workers=False, prefetch_factor=4 if self.workers else None,
            # its own generator: the loader's seed draw must not advance the global RNG
            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=ignore_stop_signals, **options,
        )

    def _count(self, micro: MicroBatch) -> None:
        self.seen += len(micro) + len(micro.bad)
        self.bad_count += len(micro.bad)
        if len(self.bad) < 20:
            self.bad.extend(micro.bad[: 20 - len(self.bad)])
        self.check_bad()

    def check_bad(self) -> None:
        """DataError when more than ``max_bad_fraction`` of the samples read so far (at least 64) were bad."""
        if self.seen >= 64 and self.bad_count > self.max_bad_fraction * self.seen:
            examples = "; ".join(f"#{b.index}: {b.reason}" for b in self.bad[:3])
            raise DataError(
                f"{self.bad_count} of {self.seen} samples of {self.source_name} are unreadable "
                f"(more than {self.max_bad_fraction:.0%}); e.g. {examples}"
            )


class _StreamMicroBatches(IterableDataset):
    """A rank's micro-batches from a streaming source (`clipforge.data.shards.ShardSource`).

    Micro-batch j of the rank (j = step·K + k) is made by loader worker (j - start) mod N from
    the records of consumer rank·N + (j mod N) — so the stream of micro-batch j does not depend
    on where a run started, and the loader's round-robin over workers returns them in order.
    Each micro-batch takes the next ``size`` records of its consumer, bad ones included (they
    are skipped and counted, as in the map-style path), so skipping consumed records needs no
    decoding.
    """

    def __init__(self, source: Any, *, rank: int, world: int, slots: int, size: int, accum: int, start: int,
                 seed: int, prepare: _Prepare, collate: _Collate) -> None:
        self.source, self.rank, self.world, self.slots, self.size = source, rank, world, slots, size
        self.accum, self.start, self.seed, self.prepare, self.collate = accum, start, seed, prepare, collate

    def __iter__(self) -> Iterator[MicroBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.slots:
            raise RuntimeError(f"stream built for {self.slots} loader workers, running in {workers}")
        slot = (worker + self.start) % workers  # the micro-batches j ≡ slot (mod N) are this worker's
        records = self.source.consumer_stream(self.rank * workers + slot, self.world * workers, seed=self.seed)
        done_before = len(range(slot, self.start, workers))  # this slot's micro-batches before `start`
        records = itertools.islice(records, done_before * self.size, None)
        j = self.start + (slot - self.start) % workers
        position = done_before * self.size  # index of the next record in this consumer's stream
        while True:
            items = []
            for record in itertools.islice(records, self.size):
                # an error record's decode raises its message, which names the shard
                name = "" if record.error else record.name
                items.append(self.prepare(record.decode, position, j // self.accum, name=name))
                position += 1
            yield self.collate(items)
            j += workers


class StreamBatchStream(BatchStream):
    """`BatchStream` for streaming sources: the same interface, micro-batches from `_StreamMicroBatches`.

    Resuming at step k replays each consumer's stream and skips the records consumed before k,
    so the run reads what an uninterrupted one would — given the same seed, world size, batch
    size, accumulation and number of workers.
    """

    def __init__(
        self,
        source: Any,
        *,
        batch_size: int,
        seed: int,
        preprocess: Callable,
        tokenizer: Callable[[list[str]], Tensor],
        rank: int = 0,
        world: int = 1,
        accum: int = 1,
        augment: bool = False,
        noise: tuple[float, ...] = (),
        workers: int = 0,
        max_bad_fraction: float = 0.1,
        source_name: str = "data",
    ) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.micro_size = _micro_size(batch_size, world, accum)
        self._setup(preprocess, tokenizer, seed=seed, accum=accum, augment=augment, noise=noise, workers=workers,
                    max_bad_fraction=max_bad_fraction, source_name=source_name)

    def epoch(self, step: int) -> float | None:
        return None  # a stream's length is not known

    def _micro_batches(self, start: int, stop: int) -> Iterable[MicroBatch]:
        dataset = _StreamMicroBatches(
            self.source, rank=self.rank, world=self.world, slots=max(1, self.workers), size=self.micro_size,
            accum=self.accum, start=start * self.accum, seed=self.seed, prepare=self.prepare, collate=self.collate,
        )
        # the stream never ends: take this run's micro-batches (the workers shut down with the loader)
        return itertools.islice(self._loader(dataset, batch_size=None), (stop - start) * self.accum)


def captions_of(source: Any, limit: int) -> Sequence[str]:
    """Up to ``limit`` captions of a source, cheaply where it can give captions alone."""
    if getattr(source, "streaming", False):
        return source.captions(limit)
    n = min(len(source), limit)
    get = getattr(source, "caption", None)
    out = []
    for k in range(n):
        try:
            text = get(k) if callable(get) else source[k][1]
            if isinstance(text, bytes):  # as `_Samples` reads it; non-UTF-8 is skipped (a ValueError)
                text = text.decode("utf-8")
        except (OSError, ValueError, IndexError):
            continue
        if text and text.strip():
            out.append(text.strip())
    return out
