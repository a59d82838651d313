"""``pairs:DIR`` — images with caption files beside them — as training reads it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from clipforge.data import DataError, open_data


def make_folder(root):
    (root / "sub").mkdir(parents=True)
    for k, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (16, 16), colour).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text(f"a {colour} square\n", encoding="utf-8")
    Image.new("RGB", (16, 16), "white").save(root / "sub" / "w.jpg")
    (root / "sub" / "w.txt").write_bytes(b"caf\xe9")  # not UTF-8
    Image.new("RGB", (16, 16), "black").save(root / "nocaption.png")
    (root / "notes.txt").write_text("not a caption of anything")


def test_pairs_are_found_sorted_and_read(tmp_path):
    make_folder(tmp_path)
    source = open_data(f"pairs:{tmp_path}")
    assert [p.name for p in source.image_paths] == ["0.png", "1.png", "2.png", "w.jpg"]
    assert source.missing_captions == 1
    image, caption = source[1]
    assert caption == "a green square" and image.getpixel((0, 0)) == (0, 128, 0)
    with pytest.raises(DataError, match=r"sub/w.txt:1: not UTF-8 text \(.* at byte 3\)"):
        source[3]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        open_data(f"pairs:{tmp_path / 'nope'}")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="no image with a caption file.*1 image"):
        open_data(f"pairs:{tmp_path}")


def test_training_on_pairs_skips_the_bad_caption(tmp_path):
    from clipforge.train import TrainConfig, train

    make_folder(tmp_path / "data")
    final = train(TrainConfig(model="tiny", data=f"pairs:{tmp_path / 'data'}", out=str(tmp_path / "run"), steps=2,
                              batch_size=4, warmup=1, vocab_size=520, save_every=2, log_every=1, progress=False))
    assert final["bad_samples"] == 2  # the non-UTF-8 caption, read once in each of the two steps
    assert "w.txt:1: not UTF-8 text" in final["bad_examples"][0]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 2


def test_evaluation_skips_an_empty_caption_and_stops_on_one_that_is_not_utf8(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "1.txt").write_text("  \n")
    source = open_data(f"pairs:{tmp_path}")
    with pytest.raises(DataError, match=r"w.txt:1: not UTF-8 text"):
        source.caption_index()
    (tmp_path / "sub" / "w.txt").write_text("a white square")
    index = source.caption_index()
    assert index.captions == ["a red square", "a blue square", "a white square"]
    assert index.text_to_image == [0, 2, 3] and index.skipped == 1
