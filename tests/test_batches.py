"""Deterministic batches (`BatchPlan`) and their loading (`BatchStream`): which samples each
step reads on each rank, and how bad samples are skipped and counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import DataError
from clipforge.data.batches import BatchPlan, BatchStream, captions_of
from clipforge.transforms import image_transform


def flat(plan: BatchPlan, steps: range) -> list[int]:
    return [i for step in steps for i in plan.global_indices(step)]


# --------------------------------------------------------------------------------------
# BatchPlan
# --------------------------------------------------------------------------------------


def test_a_step_is_a_pure_function_of_seed_and_step():
    a, b = BatchPlan(10, batch_size=4, seed=3), BatchPlan(10, batch_size=4, seed=3)
    order = [7, 0, 30, 3, 7, 1]  # out of order, far ahead and back: the epoch cache must not matter
    assert [a.global_indices(s) for s in order] == [b.global_indices(s) for s in order[::-1]][::-1]
    fresh = {s: BatchPlan(10, batch_size=4, seed=3).global_indices(s) for s in set(order)}
    assert [a.global_indices(s) for s in order] == [fresh[s] for s in order]
    assert BatchPlan(10, batch_size=4, seed=4).global_indices(0) != fresh[0]  # the seed matters


def test_each_epoch_reads_its_own_permutation_exactly_once():
    plan = BatchPlan(10, batch_size=4, seed=0)
    positions = flat(plan, range(10))  # 40 positions: epochs 0..3
    epochs = [positions[e * 10 : (e + 1) * 10] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    # step 2 reads positions 8..11: the last two of epoch 0, then the first two of epoch 1
    assert plan.global_indices(2) == epochs[0][8:] + epochs[1][:2]
    assert plan.epoch(5) == 2.0 and plan.epoch(2) == 0.8


def test_a_batch_larger_than_the_data_set_spans_epochs():
    plan = BatchPlan(3, batch_size=8, seed=1)
    first = plan.global_indices(0)
    assert sorted(first[:3]) == sorted(first[3:6]) == [0, 1, 2] and len(first) == 8


@pytest.mark.parametrize("world,accum", [(1, 3), (2, 1), (2, 3), (3, 2)])
def test_ranks_and_micro_batches_split_the_single_process_batch(world, accum):
    batch = 12 if world * accum != 4 else 8
    single = BatchPlan(17, batch_size=batch, seed=5)  # 17 rows: steps straddle epochs at odd places
    plans = [BatchPlan(17, batch_size=batch, seed=5, rank=r, world=world, accum=accum) for r in range(world)]
    for step in (0, 1, 2, 9):
        shares = [plan.micro_batches(step) for plan in plans]
        for micro in shares:
            assert len(micro) == accum and all(len(m) == batch // (world * accum) for m in micro)
        assert [i for micro in shares for m in micro for i in m] == single.global_indices(step)


def test_batch_size_must_divide_by_ranks_times_micro_batches():
    with pytest.raises(ValueError, match=r"batch_size=12 must be divisible by world size 2 × accum_steps 4"):
        BatchPlan(100, batch_size=12, seed=0, world=2, accum=4)
    with pytest.raises(DataError, match="empty"):
        BatchPlan(0, batch_size=4, seed=0)


# --------------------------------------------------------------------------------------
# BatchStream: loading, augmentation, bad samples
# --------------------------------------------------------------------------------------


class Source:
    """n gradients (so that crops differ) captioned by their index; ``bad`` maps indices to
    the fault they have."""

    def __init__(self, n: int, bad: dict[int, str] | None = None) -> None:
        self.n, self.bad = n, bad or {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        fault = self.bad.get(index)
        if fault == "missing":
            raise FileNotFoundError(f"no file for sample {index}")
        ramp = (np.add.outer(np.arange(24), 2 * np.arange(24)) * 3 + index) % 256  # (24, 24)
        image = Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], -1).astype(np.uint8))
        caption = {"empty": "  ", "bytes": b"\xff\xfe not utf-8"}.get(fault, f"sample {index}")
        return image, caption


def tokens(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(t)] for t in texts])


def stream(source, plan, **kw) -> BatchStream:
    return BatchStream(source, plan, preprocess=image_transform(16), tokenizer=tokens, **kw)


def test_the_stream_reads_what_the_plan_says():
    plan = BatchPlan(10, batch_size=6, seed=2, accum=2)
    steps = list(stream(Source(10), plan).steps(0, 4))
    assert len(steps) == 4
    for step, micro in enumerate(steps):
        assert [m.indices for m in micro] == plan.micro_batches(step)
        assert all(m.images.shape == (3, 3, 16, 16) and m.tokens.shape == (3, 1) for m in micro)


def test_augmentation_depends_on_seed_step_and_index_only():
    """Random crops are drawn from a generator seeded by (seed, step, index): a stream
    started at step 3 (a resumed run), or loaded by worker processes, gives the same pixels."""
    plan = BatchPlan(10, batch_size=4, seed=0)
    augmented = image_transform(16, train=True)

    def run(start, workers=0):
        s = BatchStream(Source(10), plan, preprocess=augmented, tokenizer=tokens, augment=True, workers=workers)
        return [m.images for micro in s.steps(start, 5) for m in micro]

    whole = run(0)
    for a, b in zip(run(3), whole[3:]):
        assert torch.equal(a, b)
    for a, b in zip(run(0, workers=2), whole):
        assert torch.equal(a, b)
    # a sample read again in the next epoch gets another crop
    pixels = {(step, i): x for step, images in enumerate(whole) for i, x in zip(plan.global_indices(step), images)}
    index = plan.global_indices(0)[0]
    (step,) = [s for s in range(2, 5) if index in plan.global_indices(s)]
    assert not torch.equal(pixels[(0, index)], pixels[(step, index)])


def test_image_noise_is_gaussian_per_channel_and_a_function_of_seed_step_and_index():
    """Noise is added after preprocessing, with the per-channel std asked for, drawn from a
    generator seeded by (seed, step, index): a resumed stream or worker processes add the same."""
    plan = BatchPlan(10, batch_size=4, seed=0)
    std = (0.5, 0.25, 0.125)

    def run(start, workers=0, noise=std):
        s = stream(Source(10), plan, noise=noise, workers=workers)
        return [m.images for micro in s.steps(start, 5) for m in micro]

    clean, noisy = run(0, noise=()), run(0)
    for a, b in zip(run(3), noisy[3:]):
        assert torch.equal(a, b)
    for a, b in zip(run(0, workers=2), noisy):
        assert torch.equal(a, b)
    draws = torch.cat([n - c for n, c in zip(noisy, clean)]).transpose(0, 1).flatten(1)  # [3, 5·4·16·16]
    for channel, expected in enumerate(std):  # 5,120 draws a channel: the sample std is within 4 % of sigma
        assert abs(draws[channel].std().item() / expected - 1) < 0.04
        assert abs(draws[channel].mean().item()) < 4 * expected / draws.shape[1] ** 0.5
    # two samples, or one sample at two steps, get different noise
    assert not torch.allclose(noisy[0][0] - clean[0][0], noisy[0][1] - clean[0][1])
    pixels = {(step, i): x - c for step, (images, cl) in enumerate(zip(noisy, clean))
              for i, x, c in zip(plan.global_indices(step), images, cl)}
    index = plan.global_indices(0)[0]
    (step,) = [s for s in range(2, 5) if index in plan.global_indices(s)]
    assert not torch.allclose(pixels[(0, index)], pixels[(step, index)])


def test_bad_samples_are_skipped_counted_and_named():
    source = Source(8, bad={1: "missing", 4: "empty", 6: "bytes"})
    s = stream(source, BatchPlan(8, batch_size=8, seed=0), max_bad_fraction=1.0)
    (micro,) = next(iter(s.steps(0, 1)))
    assert sorted(micro.indices) == [0, 2, 3, 5, 7] and micro.images.shape[0] == 5
    reasons = {b.index: b.reason for b in micro.bad}
    assert set(reasons) == {1, 4, 6} and (s.seen, s.bad_count) == (8, 3)
    assert "FileNotFoundError" in reasons[1] and reasons[4] == "empty caption" and "UnicodeDecodeError" in reasons[6]
    assert captions_of(source, 8) == [f"sample {k}" for k in (0, 2, 3, 5, 7)]  # the BPE never sees bad captions


def test_a_micro_batch_of_only_bad_samples_is_empty_not_an_error():
    source = Source(4, bad={k: "missing" for k in range(4)})
    s = stream(source, BatchPlan(4, batch_size=4, seed=0), max_bad_fraction=1.0)
    (micro,) = next(iter(s.steps(0, 1)))
    assert len(micro) == 0 and len(micro.bad) == 4


def test_too_many_bad_samples_stop_the_stream_once_64_were_read():
    """25 % bad against a limit of 10 %: the first 7 steps of 8 (56 samples) pass; reading
    the 64th sample raises a DataError naming the source and examples."""
    source = Source(32, bad={k: "missing" for k in range(0, 32, 4)})
    s = stream(source, BatchPlan(32, batch_size=8, seed=0), max_bad_fraction=0.1, source_name="toy://")
    seen = []
    expected = r"16 of 64 samples of toy:// are unreadable \(more than 10%\); e\.g\. #\d+: FileNotFoundError"
    with pytest.raises(DataError, match=expected):
        for micro in s.steps(0, 20):
            seen.append(micro)  # noqa: PERF402 - counts what came before the error
    assert len(seen) == 7
    # at the limit it carries on: with whole epochs per step exactly 25 % are bad, which
    # max_bad_fraction = 0.25 allows
    s = stream(source, BatchPlan(32, batch_size=32, seed=0), max_bad_fraction=0.25)
    assert len(list(s.steps(0, 5))) == 5 and (s.seen, s.bad_count) == (160, 40)


def test_read_errors_are_bad_data_but_transform_errors_propagate(tmp_path):
    """Only reading a sample makes it bad data.  A truncated PNG that a source opens lazily
    fails when decoded, before the transform sees it: a bad sample.  An error raised by the
    transform itself is a bug and stops the stream, whatever its type."""
    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(whole)
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[:200])

    class Lazy:  # Image.open reads the header only; the pixels are decoded on first use
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return Image.open(tmp_path / ("whole.png", "cut.png")[index]), f"sample {index}"

    s = stream(Lazy(), BatchPlan(2, batch_size=2, seed=0), max_bad_fraction=1.0)
    (micro,) = next(iter(s.steps(0, 1)))
    assert micro.indices == [0] and [b.index for b in micro.bad] == [1]
    assert micro.bad[0].reason.startswith("OSError") and "truncated" in micro.bad[0].reason

    for error in (TypeError, IndexError, SyntaxError, ValueError, OSError):
        def broken(image, error=error):
            raise error("a bug in the transform")

        s = BatchStream(Source(4), BatchPlan(4, batch_size=4, seed=0), preprocess=broken, tokenizer=tokens,
                        max_bad_fraction=1.0)
        with pytest.raises(error, match="a bug in the transform"):
            next(iter(s.steps(0, 1)))
    # a transform that does not take augmentation's generator is a bug too, not 4 bad samples
    def no_generator(image):
        return torch.zeros(3, 16, 16)

    s = BatchStream(Source(4), BatchPlan(4, batch_size=4, seed=0), preprocess=no_generator, tokenizer=tokens,
                    augment=True, max_bad_fraction=1.0)
    with pytest.raises(TypeError, match="generator"):
        next(iter(s.steps(0, 1)))


def test_rows_of_a_caption_file_carry_the_image_they_show(tmp_path):
    """A caption file with several captions per image gives each row its image's index (the
    loss's group labels); sources where every item is its own image give none."""
    from clipforge.data import open_data
    from clipforge.data.batches import image_groups

    for k in range(3):
        Source(3)[k][0].save(tmp_path / f"{k}.png")
    rows = [(0, "a"), (1, "b"), (0, "c"), (2, "d"), (1, "e"), (0, "f")]
    (tmp_path / "many.csv").write_text("filepath,title\n" + "".join(f"{k}.png,{c}\n" for k, c in rows))
    (tmp_path / "one.csv").write_text("filepath,title\n" + "".join(f"{k}.png,{c}\n" for k, c in rows[:2] + rows[3:4]))
    source = open_data(f"csv:{tmp_path / 'many.csv'}")
    assert image_groups(source).tolist() == [k for k, _ in rows]

    plan = BatchPlan(6, batch_size=4, seed=1, accum=2)
    for step, micro in enumerate(stream(source, plan).steps(0, 3)):
        assert [m.indices for m in micro] == plan.micro_batches(step)
        for m in micro:
            assert m.groups.tolist() == [rows[i][0] for i in m.indices]
    for uri in (f"csv:{tmp_path / 'one.csv'}", "shapes://?n=8&size=16"):
        source = open_data(uri)
        assert image_groups(source) is None
        plan = BatchPlan(len(source), batch_size=4, seed=0)
        assert all(m.groups is None for micro in stream(source, plan).steps(0, 2) for m in micro)
