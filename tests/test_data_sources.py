"""Tests for clipforge.data: URIs, image folders, caption files, and skipping unreadable images."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import (
    CaptionSet,
    DataError,
    DataURI,
    ImageFolder,
    open_data,
    parse_data_uri,
    read_captions,
    register_scheme,
    scan_image_folder,
    schemes,
)
from clipforge.data.images import ImageLoader, describe_skipped


def image_bytes(seed: int, fmt: str = "PNG", size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, seed: int, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 255


# ----------------------------------------------------------------------------- URIs


def test_parse_data_uri_forms():
    assert parse_data_uri("imagefolder:/data/val") == DataURI("imagefolder", "/data/val", {})
    assert parse_data_uri("csv://rel/pairs.tsv") == DataURI("csv", "rel/pairs.tsv", {})
    assert parse_data_uri("JSONL:c.jsonl?caption_key=text&image_key=img") == DataURI(
        "jsonl", "c.jsonl", {"caption_key": "text", "image_key": "img"}
    )
    assert str(parse_data_uri("csv:a.csv?sep=tab")) == "csv:a.csv?sep=tab"
    uri = DataURI("csv", "x.csv")
    assert parse_data_uri(uri) is uri
    assert {"imagefolder", "csv", "jsonl"} <= set(schemes())


@pytest.mark.parametrize(
    "text, message",
    [
        ("/data/val", "does not start with a known scheme"),
        ("C:/data/val", "does not start with a known scheme"),
        ("webdataset:x", "imagefolder:, folder:, csv:, jsonl:"),
        ("csv:a.csv?novalue", "key=value"),
    ],
)
def test_parse_data_uri_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_data_uri(text)


def test_a_module_can_register_a_scheme():
    def open_shapes(location: str, *, n: str = "10") -> list[int]:
        return list(range(int(n)))

    register_scheme("testshapes", "generated shapes", open_shapes)
    try:
        assert open_data("testshapes://?n=3") == [0, 1, 2]
        assert open_data("testshapes:", n="2") == [0, 1]
        with pytest.raises(ValueError, match="does not take these options"):
            open_data("testshapes://?colour=red")
    finally:
        from clipforge.data import _SCHEMES

        _SCHEMES.pop("testshapes")
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_scheme("Bad-Name", "", open_shapes)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_follows_torchvision_order(tmp_path):
    root = tmp_path / "val"
    write_image(root / "dog" / "b.png", 1)
    write_image(root / "dog" / "A.JPG", 2, "JPEG")
    write_image(root / "cat" / "nested" / "z.png", 3)
    write_image(root / "cat" / "m.webp", 4, "WEBP")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    (root / "stray.png").write_bytes(image_bytes(5))  # not in a class folder: ignored
    folder = open_data(f"imagefolder:{root}")
    assert isinstance(folder, ImageFolder)
    assert folder.classes == ["cat", "dog", "empty_class"]
    relative = [(p.relative_to(root).as_posix(), label) for p, label in folder.samples]
    # torchvision: per class, os.walk sorted by folder, files sorted within a folder.
    assert relative == [("cat/m.webp", 0), ("cat/nested/z.png", 0), ("dog/A.JPG", 1), ("dog/b.png", 1)]
    assert folder.targets == [0, 0, 1, 1]
    assert len(folder) == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        scan_image_folder(tmp_path / "absent")
    (tmp_path / "flat.png").write_bytes(image_bytes(0))
    with pytest.raises(DataError, match=f"no class sub-folders .*; for an unlabelled folder of images use "
                                        f"folder:{tmp_path}$"):
        scan_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"no image files .* in its 1 class folder"):
        scan_image_folder(tmp_path)


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    root = tmp_path / "val"
    write_image(root / "a" / "good1.png", 1)
    (root / "a" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    truncated = image_bytes(2, "JPEG", size=64)
    (root / "b" ).mkdir()
    (root / "b" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    write_image(root / "b" / "good2.jpg", 3, "JPEG")
    os.symlink(root / "nowhere.png", root / "b" / "missing.png")  # a broken link: the file is gone
    folder = scan_image_folder(root)
    assert len(folder) == 5
    loader = folder.images(to_tensor, batch_size=2)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 2
    names = [folder.paths[i].name for i in loader.kept]
    assert names == ["good1.png", "good2.jpg"]
    reasons = {Path(s.path).name: s.reason for s in loader.skipped}
    assert reasons.keys() == {"corrupt.jpg", "truncated.jpg", "missing.png"}
    assert reasons["missing.png"] == "file not found"
    assert reasons["corrupt.jpg"] == "not an image Pillow can identify"
    assert "truncated" in reasons["truncated.jpg"].lower()
    text = describe_skipped(loader.skipped)
    assert text.startswith("3 unreadable image(s), e.g. corrupt.jpg")
    # A second pass starts the accounting afresh.
    list(loader)
    assert len(loader.skipped) == 3 and len(loader.kept) == 2


def test_a_source_without_readable_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG broken")
    loader = scan_image_folder(tmp_path).images(to_tensor)
    with pytest.raises(DataError, match=rf"imagefolder:{tmp_path}: none of the 1 images could be read"):
        list(loader)


def test_image_loader_with_worker_processes_keeps_order(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(5)]
    paths.insert(2, tmp_path / "absent.png")
    loader = ImageLoader(paths, to_tensor, batch_size=2, num_workers=2)
    images = torch.cat(list(loader))
    assert loader.kept == [0, 1, 3, 4, 5]
    expected = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths if p.exists()])
    torch.testing.assert_close(images, expected)


# ----------------------------------------------------------------------------- caption files


def test_openclip_tsv_with_several_captions_per_image(tmp_path):
    (tmp_path / "data").mkdir()
    tsv = tmp_path / "data" / "pairs.tsv"
    tsv.write_text(
        "filepath\ttitle\n"
        "img/1.jpg\ta red bus\n"
        "img/2.jpg\ta cat\n"
        f"{tmp_path}/abs.jpg\tan absolute path\n"
        "img/../img/1.jpg\tthe same bus again\n"
        "\n"
        "img/3.jpg\t  \n"
    )
    pairs = open_data(f"csv:{tsv}")
    assert isinstance(pairs, CaptionSet)
    base = tmp_path / "data"
    assert pairs.image_paths == [base / "img/1.jpg", base / "img/2.jpg", tmp_path / "abs.jpg"]
    assert pairs.captions == ["a red bus", "a cat", "an absolute path", "the same bus again"]
    assert pairs.text_to_image == [0, 1, 2, 0]
    assert pairs.empty_captions == 1  # img/3.jpg had only an empty caption, so it is not an image here


def test_comma_csv_with_quotes_and_named_columns(tmp_path):
    csv_file = tmp_path / "c.csv"
    csv_file.write_text('id,caption,path\n1,"a dog, running",d.png\n2,"say ""hi""",e.png\n')
    pairs = read_captions(csv_file, image_key="path")
    assert pairs.captions == ["a dog, running", 'say "hi"']
    assert [p.name for p in pairs.image_paths] == ["d.png", "e.png"]
    semicolons = tmp_path / "s.txt"
    semicolons.write_text("image;text\nx.png;a thing\n")
    assert read_captions(semicolons, sep=";").captions == ["a thing"]


@pytest.mark.parametrize(
    "content, options, message",
    [
        ("filepath\ttitle\na.jpg\tok\nb.jpg\tone\textra\n", {}, r"t.csv:3: 3 field\(s\) where the header has 2"),
        ("filepath\ttitle\n\tno image\n", {}, r"t.csv:2: the image path is empty"),
        ("file\tcaption\na.jpg\tx\n", {"image_key": "filepath"}, r"t.csv:1: no image path column 'filepath'"),
        ("what\tever\na\tb\n", {}, r"t.csv:1: none of the columns \['what', 'ever'\]"),
        ("\n", {}, r"t.csv: empty caption file"),
        ("\n\nfilepath\ttitle\na.jpg\tok\n", {}, r"t.csv:1: no header line"),
        ("filepath\ttitle\na.jpg\t \n", {}, r"t.csv: no image with a non-empty caption"),
        ("filepath\ttitle\n", {"sep": "::"}, "separator"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, content, options, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_captions(path, **options)


def test_jsonl_with_caption_lists(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        {"image": "a.png", "captions": ["one", "two", ""]},
        {"image": "b.png", "captions": "three"},
        {"image": "a.png", "captions": ["four"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    pairs = open_data(f"jsonl:{path}")
    assert pairs.captions == ["one", "two", "three", "four"]
    assert pairs.text_to_image == [0, 0, 1, 0]
    assert pairs.empty_captions == 1
    assert pairs.source == f"jsonl:{path}"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"image": "a.png", "caption": "x"}', "{oops"], r"t.jsonl:2: not valid JSON"),
        (['{"image": "a.png", "caption": "x"}', '{"caption": "y"}'], r"t.jsonl:2: no 'image' key"),
        (['["a.png", "x"]'], r"t.jsonl:1: expected a JSON object, got list"),
        (['{"image": "a.png", "caption": 5}'], r"t.jsonl:1: a caption must be a string"),
        (['{"image": null, "caption": "x"}'], r"t.jsonl:1: the image path is empty"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_captions(path)


def test_missing_caption_file_and_unknown_options(tmp_path):
    for uri in ("csv:", "jsonl://", "imagefolder:"):
        with pytest.raises(DataError, match="needs a"):
            open_data(uri)
    with pytest.raises(DataError, match="absent.csv: no such caption file"):
        open_data(f"csv:{tmp_path}/absent.csv")
    with pytest.raises(DataError, match="a folder, not a caption file"):
        open_data(f"jsonl:{tmp_path}")
    with pytest.raises(ValueError, match="does not take these options"):
        open_data(f"jsonl:{tmp_path}/x.jsonl?sep=tab")


def test_select_images_drops_the_captions_of_skipped_images(tmp_path):
    pairs = CaptionSet("csv:x", [Path("a"), Path("b"), Path("c")], ["a1", "b1", "a2", "c1", "b2"], [0, 1, 0, 2, 1])
    kept = pairs.select_images([0, 2])
    assert kept.image_paths == [Path("a"), Path("c")]
    assert kept.captions == ["a1", "a2", "c1"]
    assert kept.text_to_image == [0, 0, 1]


def test_caption_set_images_skip_missing_files(tmp_path):
    write_image(tmp_path / "here.png", 0)
    path = tmp_path / "c.csv"
    path.write_text("filepath,title\nhere.png,present\ngone.png,absent\n")
    pairs = read_captions(path)
    loader = pairs.images(to_tensor)
    assert sum(len(b) for b in loader) == 1
    assert loader.kept == [0] and loader.skipped[0].reason == "file not found"
    assert loader.skipped[0].path == str(tmp_path / "gone.png")


# ----------------------------------------------------------------------------- text files users give

NOT_UTF8 = b"image\tcaption\nimg.png\tcaf\xe9\n"  # \xe9 (Latin-1 é) at byte 25, on line 2


def test_read_text_names_the_file_line_and_byte(tmp_path):
    from clipforge.data.text import lines, read_text

    path = tmp_path / "c.tsv"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(DataError, match=r"c.tsv:2: not UTF-8 text \(invalid continuation byte at byte 25\)$"):
        read_text(path)
    # a byte-order mark is dropped, and offsets still count the file's bytes
    path.write_bytes(b"\xef\xbb\xbf" + NOT_UTF8)
    with pytest.raises(DataError, match=r"c.tsv:2: not UTF-8 text \(.* at byte 28\)$"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfa\r\nb\rc\nd\xe2\x80\xa8e\x0cf")  # U+2028 and a form feed inside a line
    assert read_text(path) == "a\r\nb\rc\nd\u2028e\x0cf"
    assert list(lines(read_text(path))) == ["a", "b", "c", "d\u2028e\x0cf"]
    with pytest.raises(DataError, match="absent.txt: no such class-name file$"):
        read_text(tmp_path / "absent.txt", what="class-name file")
    with pytest.raises(DataError, match=f"{tmp_path}: a folder, not a file$"):
        read_text(tmp_path)
    path.write_bytes(b" \n\n")
    with pytest.raises(DataError, match="c.tsv: empty caption file$"):
        read_text(path, what="caption file")
    assert read_text(path, allow_empty=True) == " \n\n"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight tiny model saved with a small tokenizer: the commands load it before the data."""
    from clipforge.checkpoints import load_model, save
    from clipforge.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = load_model("tiny")
    save(model, root / "model", tokenizer=train_bpe(["a red circle", "a blue square"] * 3, 520, min_frequency=1,
                                                    context_length=model.context_length))
    return root / "model"


def assert_one_line(err: str, *parts: str) -> None:
    """stderr is one error line holding every part, with no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def bad_inputs(root: Path) -> dict[str, Path]:
    """One non-UTF-8 file of each kind a command reads, and an image folder to go with them."""
    write_image(root / "images" / "cat" / "a.png", 0)
    write_image(root / "pairs" / "b.png", 1)
    (root / "pairs" / "b.txt").write_bytes(b"caf\xe9")
    files = {"csv": root / "c.tsv", "jsonl": root / "c.jsonl", "classnames": root / "names.txt",
             "templates": root / "templates.json", "negatives": root / "negatives.txt"}
    files["csv"].write_bytes(NOT_UTF8)
    files["jsonl"].write_bytes(b'{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "caf\xe9"}\n')
    files["classnames"].write_bytes(b"caf\xe9\n")
    files["templates"].write_bytes(b'["a photo of a {c}", "caf\xe9 {c}"]')
    files["negatives"].write_bytes(b"a dog\ncaf\xe9\n")
    return files


@pytest.mark.parametrize("case", ["csv", "jsonl", "pairs", "classnames", "templates"])
def test_eval_stops_on_a_text_file_that_is_not_utf8_naming_it(tiny_model, tmp_path, capsys, case):
    files = bad_inputs(tmp_path)
    argv = {
        "csv": ["retrieval", "--data", f"csv:{files['csv']}"],
        "jsonl": ["retrieval", "--data", f"jsonl:{files['jsonl']}"],
        "pairs": ["retrieval", "--data", f"pairs:{tmp_path / 'pairs'}"],
        "classnames": ["zeroshot", "--data", f"imagefolder:{tmp_path / 'images'}", "--classnames",
                       str(files["classnames"])],
        "templates": ["zeroshot", "--data", f"imagefolder:{tmp_path / 'images'}", "--templates",
                      str(files["templates"])],
    }[case]
    where = {"csv": "c.tsv:2", "jsonl": "c.jsonl:2", "pairs": "b.txt:1", "classnames": "names.txt:1",
             "templates": "templates.json:1"}[case]
    from clipforge.cli import main

    assert main(["eval", *argv, "--model", str(tiny_model), "--workers", "0", "--quiet"]) == 2
    assert_one_line(capsys.readouterr().err, where, "not UTF-8 text", "at byte")


def test_train_stops_on_a_caption_file_that_is_not_utf8_naming_it(tmp_path, capsys):
    from clipforge.cli import main

    files = bad_inputs(tmp_path)
    code = main(["train", "--model", "tiny", "--data", f"csv:{files['csv']}", "--out", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "2"])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "c.tsv:2: not UTF-8 text (invalid continuation byte at byte 25)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_stops_on_a_negatives_file_that_is_not_utf8_naming_it(tmp_path, capsys):
    from clipforge.cli import main

    files = bad_inputs(tmp_path)
    code = main(["generate", "--model", "tiny", "a red circle", "--out", str(tmp_path / "x.png"),
                 "--negatives", str(files["negatives"])])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "--negatives", "negatives.txt:2: not UTF-8 text", "at byte 9")
    assert not (tmp_path / "x.png").exists()


def _sigint_ignored(image):
    """A transform that records, in the process that runs it, whether SIGINT is ignored there."""
    import signal

    return torch.full((3, 1, 1), float(signal.getsignal(signal.SIGINT) == signal.SIG_IGN))


def test_image_loader_workers_ignore_the_stop_signals(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: evaluation's decoding workers ignore
    it (and SIGTERM), leaving the main process to stop and shut them down."""
    from PIL import Image

    from clipforge.data.images import ImageLoader

    paths = []
    for k in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    in_worker = torch.cat(list(ImageLoader(paths, _sigint_ignored, batch_size=2, num_workers=1)))
    in_process = torch.cat(list(ImageLoader(paths, _sigint_ignored, batch_size=2, num_workers=0)))
    assert bool((in_worker == 1).all()) and bool((in_process == 0).all())
