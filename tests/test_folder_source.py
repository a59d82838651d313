"""``folder:DIR`` — any folder of images, searched recursively — as a data source, and through
``clipforge index build`` and ``clipforge rerank``, on a nested folder holding a corrupt image,
a file that is no image, hidden files and a link back up the tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from _search_helpers import collection
from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.data import CaptionedSource, DataError, ImageFiles, ImageSource, LabelledSource, open_data
from clipforge.transforms import image_transform

# The images of the nested folder below, as `find_images` must order them: by path below the root.
FOUND = ["B.JPG", "a.png", "sub/00007.png", "sub/corrupt.png", "sub/deeper/00014.webp", "sub/deeper/00021.png"]


def nested_folder(root: Path, pictures: Path | None = None) -> Path:
    """A folder of photos as people keep them; ``pictures``: a folder of 00000.png ... to copy from."""
    def picture(path: Path, colour: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        source = pictures / path.name if pictures is not None else None
        if source is not None and source.exists():
            path.write_bytes(source.read_bytes())
        else:
            Image.new("RGB", (16, 16), colour).save(path, format="WEBP" if path.suffix == ".webp" else
                                                      "JPEG" if path.suffix.lower() == ".jpg" else "PNG")

    for name, colour in [("a.png", "red"), ("B.JPG", "blue"), ("sub/00007.png", "green"),
                         ("sub/deeper/00014.webp", "yellow"), ("sub/deeper/00021.png", "purple")]:
        picture(root / name, colour)
    (root / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("holiday 2023")  # not an image: passed over
    (root / "sub" / "list.json").write_text("[]")
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource file: hidden, and no image
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".thumbnails" / "a.png")
    os.symlink(root, root / "sub" / "loop")  # a link back up the tree: each folder is read once
    return root


def to_tensor(image):
    return image_transform(16)(image)


def test_folder_finds_images_recursively_in_a_fixed_order(tmp_path):
    source = open_data(f"folder:{nested_folder(tmp_path / 'photos')}")
    assert isinstance(source, ImageFiles) and isinstance(source, ImageSource)
    assert not isinstance(source, LabelledSource) and not isinstance(source, CaptionedSource)
    assert [p.relative_to(tmp_path / "photos").as_posix() for p in source.paths] == FOUND
    assert [source.relative(k) for k in range(len(source))] == FOUND

    loader = source.images(to_tensor, batch_size=4)
    assert [len(batch) for batch in loader] == [3, 2]
    assert loader.kept == [0, 1, 2, 4, 5]
    assert [(Path(s.path).name, s.reason) for s in loader.skipped] == [
        ("corrupt.png", "not an image Pillow can identify")]
    limited = source.images(to_tensor, limit=2)
    assert sum(len(batch) for batch in limited) == 2 and limited.kept == [0, 1]


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="folder: needs a folder"):
        open_data("folder:")
    with pytest.raises(DataError, match=f"folder:{tmp_path / 'absent'}: no such folder$"):
        open_data(f"folder:{tmp_path / 'absent'}")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="file.png: not a folder$"):
        open_data(f"folder:{tmp_path / 'file.png'}")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no image files \(\.jpg .*\) in it or its sub-folders"):
        open_data(f"folder:{tmp_path / 'empty'}")


# ----------------------------------------------------------------------------- through the commands


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """The nested folder, its pictures taken from the shared search collection (a trained micro model)."""
    c = collection(tmp_path_factory)
    return {"c": c, "root": nested_folder(tmp_path_factory.mktemp("folder") / "photos", c.images)}


def test_index_build_over_a_nested_folder(photos, tmp_path, capsys):
    pytest.importorskip("faiss")
    from clipforge.search.index import Index
    from clipforge.search.store import Store

    root, out = photos["root"], tmp_path / "photos.index"
    code = main(["index", "build", "--model", str(photos["c"].model), "--data", f"folder:{root}", "--out", str(out),
                 "--quiet", "--workers", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "5 image(s) embedded" in printed and "1 unreadable image(s)" in printed and "corrupt.png" in printed
    meta = Store.open(out).metadata().to_pydict()
    expected = [str(root / name) for name in FOUND if name != "sub/corrupt.png"]
    assert meta["key"] == expected and meta["path"] == expected
    assert meta["caption"] == [None] * 5
    assert [s["path"] for s in Store.open(out).skipped().values()] == [str(root / "sub" / "corrupt.png")]
    index = Index.load(out)
    assert index.search_image(root / "sub" / "deeper" / "00021.png", k=1)[0].path == str(root / "sub/deeper/00021.png")


def test_rerank_ranks_every_image_under_a_nested_folder(photos, tmp_path, capsys):
    from clipforge.data.images import read_rgb
    from clipforge.score import rerank

    root = photos["root"]
    code = main(["rerank", "--model", str(photos["c"].model), "--prompt", "a red circle", "--images", str(root),
                 "--out", str(tmp_path / "rerank.json"), "--quiet", "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert code == 0 and "5 of 6 images ranked; 1 unreadable image(s), e.g. corrupt.png" in printed
    result = json.loads((tmp_path / "rerank.json").read_text())
    assert result["images_ranked"] == 5 and result["skipped_images"] == 1

    model, preprocess, tokenizer = load(photos["c"].model)
    readable = [name for name in FOUND if name != "sub/corrupt.png"]
    expected = rerank(model, [preprocess(read_rgb(root / name)) for name in readable], "a red circle",
                      tokenizer=tokenizer, progress=False)
    assert [r["image"] for r in result["ranking"]] == [readable[i] for i, _ in expected]
    assert [r["cosine"] for r in result["ranking"]] == pytest.approx([c for _, c in expected], abs=1e-5)


def test_commands_that_need_labels_or_captions_refuse_a_plain_folder(photos, capsys):
    code = main(["eval", "zeroshot", "--model", str(photos["c"].model), "--data", f"folder:{photos['root']}",
                 "--quiet"])
    assert code == 2 and "ImageFiles, which has no class labels" in capsys.readouterr().err


def test_index_build_of_imagefolder_on_a_flat_folder_points_to_folder(photos, tmp_path, capsys):
    # What README's image-search lines used to say: imagefolder: wants class sub-folders.
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    code = main(["index", "build", "--model", str(photos["c"].model), "--data", f"imagefolder:{tmp_path}",
                 "--out", str(tmp_path / "photos.index"), "--quiet"])
    assert code == 2
    assert f"no class sub-folders (expected {tmp_path}/<class>/<image>); for an unlabelled folder of images use " \
           f"folder:{tmp_path}" in capsys.readouterr().err
