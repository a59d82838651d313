"""``shards:URLS`` — webdataset tar shards, streamed: the layout img2dataset writes.

    shards:/data/cc3m/{00000..00331}.tar
    shards:pipe:aws s3 cp s3://bucket/cc3m/{00000..00331}.tar -
    shards:/a/{000..009}.tar::/b/{000..004}.tar?shuffle=2000

Each shard is a tar file whose members are grouped into samples by their name without the
extension (``000000123.jpg`` + ``000000123.txt`` + ``000000123.json`` form the sample
``000000123``).  The image is the first member with an image extension (``jpg``, ``jpeg``,
``png``, ``webp``); the caption is the ``txt`` member, or the ``caption`` field of the
``json`` member.  Braces expand to lists of shards (``{000..099}``) and ``::`` joins several
lists.  A ``pipe:`` URL runs a shell command and reads the tar from its standard output, so
any object store's command-line client serves: such URLs run commands, so take them only
from people you trust.  Tar reading and URL opening are the ``webdataset`` library's.

Bad data never stops the stream: a corrupt image, an empty or non-UTF-8 caption, a missing
or truncated shard, a failing command — each becomes a `Bad` record, which training skips
and counts (and stops on when more than a set fraction of what it read is bad).

Splitting for training.  The shards are a stream, not a random-access set, so each reader
takes its own share: with W ranks and N loader workers there are W·N *consumers*; in every
epoch the shard list is shuffled by (seed, epoch) and consumer c reads shards c, c + W·N, …,
passing their samples through a seeded shuffle buffer that empties at the epoch's end.  No
sample is read twice in an epoch, and each consumer's stream is endless (epoch after epoch),
so ranks whose shares differ in length never wait on each other; shares differ by up to a
shard, so use many more shards than consumers.  With fewer shards than consumers, every
consumer reads every shard and keeps every (W·N)-th sample instead.  Everything is a
function of (seed, W, N), so a run resumed at step k replays the same stream and skips what
the first run consumed — without decoding it — and reads exactly the samples an uninterrupted
run would (same world size and workers; `train` checks).
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

from clipforge.data._errors import DataError

__all__ = ["IMAGE_SUFFIXES", "ShardSource", "ShardSample", "expand_urls", "open_shards"]

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def expand_urls(spec: str) -> list[str]:
    """``/d/{00..02}.tar::/e/x.tar`` -> ['/d/00.tar', '/d/01.tar', '/d/02.tar', '/e/x.tar']."""
    from braceexpand import braceexpand

    urls = [url for part in spec.split("::") if part.strip() for url in braceexpand(part.strip())]
    if not urls:
        raise DataError(f"shards:{spec}: no shard URLs (e.g. shards:/data/{{000..099}}.tar)")
    return urls


@dataclass(frozen=True)
class ShardSample:
    """One sample as read from a shard, before decoding; ``error`` set for a failure record."""

    key: str  # the member name without extension, e.g. "000000123"
    url: str  # the shard it came from
    members: dict[str, bytes]  # extension -> bytes
    error: str | None = None  # why this record stands for something unreadable (a shard, a sample)

    @property
    def name(self) -> str:
        """``url#key``: where to find the sample, for messages and metadata."""
        return f"{self.url}#{self.key}"

    def image_bytes(self) -> bytes:
        for suffix in IMAGE_SUFFIXES:
            if suffix in self.members:
                return self.members[suffix]
        raise ValueError(f"no image member ({', '.join(IMAGE_SUFFIXES)}) in sample {self.name}")

    def decode(self) -> tuple[Image.Image, str]:
        """(RGB image, caption); OSError/ValueError/UnicodeDecodeError for bad data."""
        if self.error is not None:
            raise ValueError(self.error)
        with Image.open(io.BytesIO(self.image_bytes())) as image:
            rgb = image.convert("RGB")
        return rgb, self.caption()

    def caption(self) -> str:
        """The ``txt`` member, else the ``json`` member's "caption"; UnicodeDecodeError for non-UTF-8."""
        if "txt" in self.members:
            return self.members["txt"].decode("utf-8").strip()
        if "json" in self.members:
            meta = json.loads(self.members["json"].decode("utf-8"))
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                return meta["caption"].strip()
        raise ValueError(f"no caption (.txt, or .json with a \"caption\") in sample {self.name}")


def _describe(err: BaseException) -> str:
    """Drops the stream objects webdataset appends to an exception's arguments."""
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    first = err.args[0] if err.args else ""
    return f"{type(err).__name__}: {first}"[:300]


def read_shard(url: str) -> Iterator[ShardSample]:
    """The samples of one shard in order; a failure (missing file, truncated tar, failing
    command) ends the shard with an error record after the samples read before it."""
    from webdataset.tariterators import tarfile_samples

    errors: list[BaseException] = []

    def handler(err: BaseException) -> bool:
        errors.append(err)
        return False  # stop this shard: what follows a tar error cannot be trusted

    for sample in tarfile_samples([{"url": url}], handler=handler):
        members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
        yield ShardSample(str(sample["__key__"]), url, members)
    if errors:
        yield ShardSample("", url, {}, error=f"shard {url}: {_describe(errors[0])}")


class ShardSource:
    """A list of tar shards; iterating gives ``(image, caption)`` for every readable sample."""

    streaming = True  # no len() and no random access: training reads it through `consumer_stream`

    def __init__(self, urls: Sequence[str], *, shuffle: int = 1000, spec: str = "") -> None:
        if not urls:
            raise DataError("shards: an empty list of shard URLs")
        if shuffle < 0:
            raise DataError(f"shards:{spec}: shuffle must be >= 0, got {shuffle}")
        self.urls, self.shuffle, self.spec = list(urls), shuffle, spec or "::".join(urls)
        self.skipped: list[str] = []  # why samples were skipped by the last `__iter__`

    def __repr__(self) -> str:
        return f"ShardSource({len(self.urls)} shards: {self.spec!r})"

    def samples(self) -> Iterator[ShardSample]:
        """Every record of every shard, in shard order, undecoded (error records included)."""
        for url in self.urls:
            yield from read_shard(url)

    def __iter__(self) -> Iterator[tuple[Image.Image, str]]:
        self.skipped = []
        for record in self.samples():
            try:
                image, caption = record.decode()
            except (OSError, ValueError, SyntaxError, UnicodeDecodeError, Image.DecompressionBombError) as err:
                self.skipped.append(record.error or f"{record.name}: {type(err).__name__}: {err}"[:300])
                continue
            if caption:
                yield image, caption
            else:
                self.skipped.append(f"{record.name}: empty caption")

    def captions(self, limit: int) -> list[str]:
        """Up to ``limit`` non-empty captions, read from the first shards without decoding images."""
        out: list[str] = []
        for record in self.samples():
            if len(out) >= limit:
                break
            try:
                text = record.caption() if record.error is None else ""
            except (ValueError, UnicodeDecodeError):
                continue
            if text:
                out.append(text)
        return out

    def consumer_stream(self, consumer: int, consumers: int, *, seed: int) -> Iterator[ShardSample]:
        """Consumer ``consumer`` of ``consumers``' endless share of the records (module docstring)."""
        if not 0 <= consumer < consumers:
            raise ValueError(f"consumer {consumer} out of range for {consumers} consumers")
        return self._share(consumer, consumers, seed)

    def epoch_share(self, consumer: int, consumers: int, *, seed: int, epoch: int) -> Iterator[ShardSample]:
        """The records consumer ``consumer`` of ``consumers`` reads in ``epoch``, before shuffling."""
        order = list(self.urls)
        random.Random(f"shards/{seed}/epoch/{epoch}").shuffle(order)
        if len(order) >= consumers:  # whole shards per consumer
            return itertools.chain.from_iterable(read_shard(url) for url in order[consumer::consumers])
        # fewer shards than consumers: everyone reads everything and keeps every consumers-th record
        records = itertools.chain.from_iterable(read_shard(url) for url in order)
        return itertools.islice(records, consumer, None, consumers)

    def _share(self, consumer: int, consumers: int, seed: int) -> Iterator[ShardSample]:
        from webdataset.filters import shuffle

        rng = random.Random(f"shards/{seed}/{consumer}")
        for epoch in itertools.count():
            good = 0
            # webdataset's shuffle buffer, filled before it yields; it empties at the end of each
            # epoch: no sample comes twice before all came once
            share = self.epoch_share(consumer, consumers, seed=seed, epoch=epoch)
            records = shuffle(self.shuffle, self.shuffle, rng=rng)(share)
            for record in records:
                good += record.error is None
                yield record
            if not good:
                shards = (
                    len(range(consumer, len(self.urls), consumers)) if len(self.urls) >= consumers else len(self.urls)
                )
                raise DataError(
                    f"shards:{self.spec}: consumer {consumer} of {consumers} (rank × loader worker) read no "
                    f"sample in an epoch of its {shards} shard(s)"
                )


def open_shards(location: str, *, shuffle: str | int = 1000) -> ShardSource:
    """Opener of ``shards:URLS[?shuffle=N]`` URIs (see `clipforge.data.open_data`)."""
    try:
        shuffle = int(shuffle)
    except ValueError:
        raise DataError(f"shards:{location}: shuffle must be an integer, got {shuffle!r}") from None
    return ShardSource(expand_urls(location), shuffle=shuffle, spec=location)
