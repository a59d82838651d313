"""shards: — webdataset tar shards: reading, bad data, splitting across ranks and workers, resuming."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.data import DataError, open_data
from clipforge.data.batches import StreamBatchStream
from clipforge.data.shards import ShardSource, expand_urls
from clipforge.train import train
from clipforge.train.config import TrainConfig


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, caption: str, colour=(200, 30, 30), *, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """One sample as img2dataset writes it: image, caption, metadata."""
    image = _jpeg(colour) if ext == "jpg" else _png(colour)
    meta = json.dumps({"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key}).encode()
    return [(f"{key}.{ext}", image), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


def write_clean_shards(root: Path, shards: int, per_shard: int) -> str:
    """``shards`` shards of ``per_shard`` samples, captions "s k" (shard, sample); their URI."""
    for s in range(shards):
        members = []
        for k in range(per_shard):
            members += sample(f"{s:02d}{k:04d}", f"{s} {k}", colour=(10 * s, 5 * k, 100))
        write_shard(root / f"{s:03d}.tar", members)
    return f"shards:{root}/{{000..{shards - 1:03d}}}.tar"


def caption_ids(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: caption "s k" -> the row [1000·s + k], so batches name their samples."""
    return torch.tensor([[1000 * int(c.split()[0]) + int(c.split()[1])] for c in captions])


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32))


def stream(uri: str, **kw) -> StreamBatchStream:
    options = dict(batch_size=8, seed=0, preprocess=to_tensor, tokenizer=caption_ids)
    options.update(kw)
    return StreamBatchStream(open_data(uri), **options)


def ids(steps) -> list[list[int]]:
    return [[int(i) for m in micro for i in m.tokens[:, 0]] for micro in steps]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def test_uri_expands_braces_and_lists():
    assert expand_urls("/d/{0..2}.tar::/e/x.tar") == ["/d/0.tar", "/d/1.tar", "/d/2.tar", "/e/x.tar"]
    source = open_data("shards:/d/{00..01}.tar?shuffle=5")
    assert isinstance(source, ShardSource) and source.urls == ["/d/00.tar", "/d/01.tar"] and source.shuffle == 5
    with pytest.raises(DataError, match="shuffle must be an integer"):
        open_data("shards:/d/x.tar?shuffle=lots")
    with pytest.raises(DataError, match="does not take these options"):
        open_data("shards:/d/x.tar?colour=red")


def test_iterating_gives_every_readable_sample_and_names_the_bad_ones(tmp_path):
    good = sample("000", "a red square") + sample("001", "a green circle", (0, 200, 0), ext="png")
    only_json = [("002.jpg", _jpeg((0, 0, 200))), ("002.json", json.dumps({"caption": "a blue star"}).encode())]
    corrupt = [("003.jpg", b"\xff\xd8 not really a jpeg"), ("003.txt", b"broken image")]
    empty = sample("004", "   ")
    latin1 = [("005.jpg", _jpeg((9, 9, 9))), ("005.txt", "caf\xe9".encode("latin-1"))]
    no_image = [("006.txt", b"a caption without its image")]
    write_shard(tmp_path / "0.tar", good + only_json + corrupt + empty + latin1 + no_image)
    # a truncated shard: the first sample survives, the cut-off rest is one error record (a cut
    # between two members reads as a shorter, valid archive: tar has no length to check against)
    write_shard(tmp_path / "full.tar", sample("100", "a white heart") + sample("101", "a cyan cross"))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "1.tar").write_bytes(data[: 512 * 8 + 100])  # sample 100 (7 blocks), then part of 101.jpg
    source = open_data(f"shards:{tmp_path}/{{0..2}}.tar")  # 2.tar is missing

    got = [(caption, image.size, image.mode) for image, caption in source]
    assert got == [("a red square", (8, 8), "RGB"), ("a green circle", (8, 8), "RGB"),
                   ("a blue star", (8, 8), "RGB"), ("a white heart", (8, 8), "RGB")]
    skipped = "\n".join(source.skipped)
    assert len(source.skipped) == 6, skipped
    assert "0.tar#003" in skipped and "0.tar#004: empty caption" in skipped
    assert "0.tar#005" in skipped and "UnicodeDecodeError" in skipped
    assert "0.tar#006" in skipped and "no image member" in skipped
    assert f"shard {tmp_path}/1.tar" in skipped  # truncated
    assert f"shard {tmp_path}/2.tar" in skipped and "FileNotFoundError: No such file" in skipped
    assert source.captions(10) == ["a red square", "a green circle", "a blue star", "broken image",
                                   "a caption without its image", "a white heart"]


def test_pipe_urls_read_what_files_read(tmp_path):
    uri = write_clean_shards(tmp_path, 2, 3)
    files = [c for _, c in open_data(uri)]
    piped = [c for _, c in open_data(f"shards:pipe:cat {tmp_path}/{{000..001}}.tar")]
    assert piped == files == ["0 0", "0 1", "0 2", "1 0", "1 1", "1 2"]
    failing = open_data(f"shards:pipe:cat {tmp_path}/nothing.tar")
    assert list(failing) == [] and "nothing.tar" in failing.skipped[0]


# --------------------------------------------------------------------------------------
# Splitting across consumers (ranks × loader workers)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumers", [1, 2, 3, 4, 5, 7])
def test_every_epoch_is_split_between_consumers_without_duplicates(tmp_path, consumers):
    """4 shards of 5 samples: whole shards per consumer up to 4 consumers, every n-th sample above."""
    source = open_data(write_clean_shards(tmp_path, 4, 5))
    everything = sorted(r.key for r in source.samples())
    for epoch in (0, 1):
        shares = [[r.key for r in source.epoch_share(c, consumers, seed=3, epoch=epoch)] for c in range(consumers)]
        assert sorted(k for share in shares for k in share) == everything
        if consumers <= 4:  # whole shards: a consumer's keys share their shard prefix
            assert all(len({k[:2] for k in share}) == len(share) // 5 for share in shares)
    orders = [[r.key for r in source.epoch_share(0, 1, seed=3, epoch=e)] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # the shard order changes with the epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_an_epoch_once_and_agree_on_the_order(tmp_path, workers):
    """4 shards × 8 = 32 samples; 2 ranks × 4 rows per step: 4 steps read each sample once."""
    uri = write_clean_shards(tmp_path, 4, 8)
    runs = []
    for _ in range(2):
        per_rank = [ids(stream(uri, rank=r, world=2, workers=workers).steps(0, 4)) for r in range(2)]
        runs.append(per_rank)
    assert runs[0] == runs[1]  # deterministic, whatever the worker timing
    read = [i for rank in runs[0] for step in rank for i in step]
    assert sorted(read) == sorted(1000 * s + k for s in range(4) for k in range(8))
    assert all(len(step) == 4 for rank in runs[0] for step in rank)


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 2)])
def test_resuming_reads_what_an_uninterrupted_run_reads(tmp_path, workers, accum):
    uri = write_clean_shards(tmp_path, 3, 7) + "?shuffle=4"
    whole = list(stream(uri, workers=workers, accum=accum).steps(0, 9))
    first = list(stream(uri, workers=workers, accum=accum).steps(0, 4))
    rest = list(stream(uri, workers=workers, accum=accum).steps(4, 9))
    assert ids(first + rest) == ids(whole)
    for a, b in zip(first + rest, whole):
        for x, y in zip(a, b):
            assert torch.equal(x.images, y.images)
    counts = Counter(i for step in ids(whole) for i in step)  # 72 rows of 21 samples: 3+ epochs
    assert set(counts) == {1000 * s + k for s in range(3) for k in range(7)}
    if workers == 0:  # one consumer reads whole epochs; two split 3 shards 2 + 1, unevenly by design
        assert max(counts.values()) - min(counts.values()) <= 1


def test_bad_samples_are_counted_and_too_many_stop_the_run(tmp_path):
    members = []
    for k in range(40):
        members += sample(f"{k:03d}", f"0 {k}") if k % 4 == 0 else [(f"{k:03d}.jpg", b"junk"), (f"{k:03d}.txt", b"0 0")]
    write_shard(tmp_path / "0.tar", members)
    uri = f"shards:{tmp_path}/0.tar"
    lenient = stream(uri, max_bad_fraction=0.9)
    steps = list(lenient.steps(0, 10))
    assert lenient.bad_count == 60 and lenient.seen == 80
    assert sum(len(m) for micro in steps for m in micro) == 20
    strict = stream(uri, max_bad_fraction=0.5)
    with pytest.raises(DataError, match=r"of 64 samples of data are unreadable .*0.tar#0\d\d: UnidentifiedImageError"):
        list(strict.steps(0, 10))


def test_shards_that_give_nothing_stop_with_an_error(tmp_path):
    with pytest.raises(DataError, match="read no sample"):
        list(stream(f"shards:{tmp_path}/{{0..1}}.tar").steps(0, 1))


# --------------------------------------------------------------------------------------
# Training from shards
# --------------------------------------------------------------------------------------


def test_training_from_shards_resumes_bit_identically(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    colours = ["red", "green", "blue", "white"]
    rgb = [(220, 30, 30), (40, 180, 40), (40, 70, 230), (245, 245, 245)]
    for s in range(3):
        members = []
        for k in range(12):
            c = (s + k) % 4
            members += sample(f"{s}{k:03d}", f"a {colours[c]} square number {k}", rgb[c])
        write_shard(shard_dir / f"{s}.tar", members)

    def config(out: Path, steps: int, **kw) -> TrainConfig:
        return TrainConfig(model="tiny", data=f"shards:{shard_dir}/{{0..2}}.tar?shuffle=8", out=str(out), steps=steps,
                           batch_size=8, warmup=1, lr=1e-3, vocab_size=600, save_every=3, log_every=1,
                           device="cpu", progress=False, **kw)

    train(config(tmp_path / "whole", 6))
    # the same run stopped after its step-3 checkpoint: a copy without the later one
    shutil.copytree(tmp_path / "whole", tmp_path / "parts")
    shutil.rmtree(tmp_path / "parts/checkpoints/step-0000006")
    train(config(tmp_path / "parts", 6, resume="latest"))
    a = load_file(tmp_path / "whole/checkpoints/step-0000006/model.safetensors")
    b = load_file(tmp_path / "parts/checkpoints/step-0000006/model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["bad_samples"] == 0
    # the stream is split between loader workers: another number of them would read other samples
    with pytest.raises(ValueError, match=r"at step 6: workers is 0 in the checkpoint, 1 now \(a streamed source"):
        train(config(tmp_path / "parts", 6, resume="latest", workers=1))


def test_two_ranks_train_from_uneven_shards_without_hanging(tmp_path):
    """5 shards of unequal length for 2 ranks: the shares differ by a shard every epoch, and
    10 steps run through several epochs — each rank's stream runs on into the next epoch, so
    neither waits for the other (a hang fails the test at its timeout)."""
    from test_train_runs import run_two_processes

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s, size in enumerate((9, 3, 6, 2, 5)):
        members = []
        for k in range(size):
            members += sample(f"{s}{k:03d}", f"shape {s} number {k}", (40 * s, 20 * k, 90))
        write_shard(shard_dir / f"{s}.tar", members)
    out = tmp_path / "run"
    config = TrainConfig(model="tiny", data=f"shards:{shard_dir}/{{0..4}}.tar?shuffle=4", out=str(out), steps=10,
                         batch_size=8, warmup=1, lr=1e-3, vocab_size=600, save_every=100, log_every=1,
                         device="cpu", progress=False)
    run_two_processes(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and all(r["bad_samples"] == 0 for r in rows)
    assert (out / "checkpoints/step-0000010/model.safetensors").is_file()
