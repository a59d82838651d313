"""The generated ``shapes://`` data and the bundled ``digits://`` data: deterministic, the
held-out colour–shape pairs truly held out, captions and labels that say what is drawn."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from clipforge.data import open_data
from clipforge.data.shapes import (
    COLOURLESS,
    COLOURS,
    HELDOUT_PAIRS,
    RGB,
    SHAPES,
    ShapesDataset,
    class_names,
)

# How captions may name each shape (the generator's synonyms).
NAMES = {"square": ("square", "box"), "circle": ("circle", "disc", "round dot"), "diamond": ("diamond", "rhombus")}


def names(shape: str) -> tuple[str, ...]:
    return NAMES.get(shape, (shape,))


def fingerprint(uri: str, indices: range) -> str:
    source, digest = open_data(uri), hashlib.sha256()
    for k in indices:
        image, caption = source[k]
        digest.update(image.tobytes() + caption.encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# shapes://
# --------------------------------------------------------------------------------------


def test_samples_are_the_same_in_another_process():
    uris = ["shapes://?size=32&n=500", "shapes://?split=heldout&size=32", "shapes://?seed=3&size=17"]
    here = [fingerprint(uri, range(0, 500, 37)) for uri in uris]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_shapes import fingerprint\n"
        f"for uri in {uris!r}: print(fingerprint(uri, range(0, 500, 37)))"
    )
    there = subprocess.run([sys.executable, "-c", code, __file__.rsplit("/", 1)[0]], capture_output=True, text=True,
                           check=True, timeout=60).stdout.split()
    assert there == here
    assert len(set(here)) == 3  # split and seed change the samples
    assert fingerprint("shapes://?size=32", range(3)) == fingerprint("shapes://?size=32&n=7", range(3))  # n only cuts


def test_heldout_pairs_lose_two_shapes_per_colour_and_two_colours_per_shape():
    assert len(HELDOUT_PAIRS) == 16
    assert Counter(c for c, _ in HELDOUT_PAIRS) == {c: 2 for c in COLOURS}
    assert Counter(s for _, s in HELDOUT_PAIRS) == {s: 2 for s in SHAPES}


def test_training_images_and_captions_never_show_a_heldout_pair():
    train = ShapesDataset(split="train", size=32, n=3000)
    seen_pairs = Counter()
    forbidden = [f"{c} {name}" for c, s in HELDOUT_PAIRS for name in names(s)]
    for k in range(len(train)):
        objs = train.objects(k)
        pairs = {(o.colour, o.shape) for o in objs}
        assert not pairs & HELDOUT_PAIRS, k
        seen_pairs.update(pairs)
        text = train.caption(k, objs)
        assert not any(phrase in text for phrase in forbidden), (k, text)
    assert len(seen_pairs) == 48  # every other pair does appear


def test_heldout_split_shows_exactly_the_heldout_pairs_one_object_each():
    heldout = ShapesDataset(split="heldout", size=32, n=64)
    pairs = [(o.colour, o.shape) for k in range(len(heldout)) for o in heldout.objects(k)]
    assert len(pairs) == 64  # one object per image
    assert set(pairs[:16]) == HELDOUT_PAIRS and Counter(pairs) == {p: 4 for p in HELDOUT_PAIRS}  # balanced
    seen = ShapesDataset(split="seen", size=32, n=96)
    seen_pairs = {(o.colour, o.shape) for k in range(96) for o in seen.objects(k)}
    assert len(seen_pairs) == 48 and not seen_pairs & HELDOUT_PAIRS


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_captions_name_every_object_by_shape_and_most_by_colour_too(split):
    data = ShapesDataset(split=split, size=32, n=400)
    objects = with_colour = 0
    for k in range(len(data)):
        text = data.caption(k)
        for o in data.objects(k):
            assert any(name in text for name in names(o.shape)), (k, o, text)
            objects += 1
            with_colour += any(f"{o.colour} {name}" in text for name in names(o.shape))
    assert with_colour / objects == pytest.approx(1 - COLOURLESS, abs=0.05)
    assert all(data.caption(k) == data[k][1] for k in range(20))  # captions alone match the pairs'


def test_class_names_and_labels_agree_with_the_objects():
    classes = class_names()
    assert len(classes) == len(set(classes)) == 64 and classes[:2] == ["red circle", "red square"]
    for split in ("seen", "heldout"):
        data = ShapesDataset(split=split, size=32, n=100)
        assert data.classnames == classes
        for k in range(len(data)):
            (o,) = data.objects(k)
            assert classes[data.label(k)] == f"{o.colour} {o.shape}"
    with pytest.raises(ValueError, match="seen' and 'heldout"):
        ShapesDataset(split="train", n=5).label(0)


def test_images_show_the_object_colour():
    """A single-object image holds pixels of its object's colour; the muted background
    never comes near the saturated palette."""
    data = ShapesDataset(split="heldout", size=64, n=16)
    for k in range(len(data)):
        image, _ = data[k]
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        (o,) = data.objects(k)
        distance = np.abs(pixels - np.array(RGB[o.colour])).max(axis=1)
        assert (distance <= 30).sum() >= 20, (k, o)


def test_uri_options_and_their_errors():
    assert len(open_data("shapes://")) == 100_000 and len(open_data("shapes://?split=seen")) == 1_024
    data = open_data("shapes://?split=val&size=20&n=5&seed=2")
    assert (data.split, data.size, data.seed, len(data)) == ("val", 20, 2, 5) and data[4][0].size == (20, 20)
    with pytest.raises(IndexError):
        data[5]
    for uri, message in [("shapes://?split=test", "split must be one of"), ("shapes://?size=8", "at least 16"),
                         ("shapes://?n=0", "n must be positive"), ("shapes://here", "takes no location")]:
        with pytest.raises(ValueError, match=message):
            open_data(uri)


# --------------------------------------------------------------------------------------
# digits://
# --------------------------------------------------------------------------------------


def test_digits_splits_are_fixed_disjoint_and_cover_the_set():
    from sklearn.datasets import load_digits

    train, test = open_data("digits://?size=16"), open_data("digits://?split=test&size=16")
    assert (len(train), len(test)) == (1438, 359)
    key = np.ndarray.tobytes  # one 8x8 scan as a hashable key
    raw = Counter(key(a) for a in load_digits().images)
    assert max(raw.values()) == 1  # the 1,797 scans are distinct, so a scan identifies a sample
    train_keys, test_keys = Counter(key(a) for a in train._images), Counter(key(a) for a in test._images)
    assert not set(train_keys) & set(test_keys) and train_keys + test_keys == raw  # disjoint, and together the set
    assert fingerprint("digits://?split=test&size=16", range(0, 359, 50)) == fingerprint(
        "digits://?split=test&size=16", range(0, 359, 50))


def test_digit_captions_and_labels_agree():
    from clipforge.data.digits import DIGIT_WORDS

    test = open_data("digits://?split=test&size=16")
    assert test.classnames == list(DIGIT_WORDS) and sorted(set(test.labels().tolist())) == list(range(10))
    for k in range(0, len(test), 7):
        image, text = test[k]
        digit = test.label(k)
        assert DIGIT_WORDS[digit] in text.split() or str(digit) in text, (k, text)
        assert image.size == (16, 16) and image.mode == "RGB"
