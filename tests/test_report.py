"""``clipforge report``: the Markdown report and its figures for a short run, checked against the
run's own metrics.jsonl / metrics.json and against a naive recomputation from its checkpoint.

The figures' data are read from the matplotlib figures themselves: ``Figure.savefig`` is
wrapped (and still called) so that the test keeps each figure it writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")  # the report's figures (the train extra installs it)
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.data import open_data
from clipforge.data.shapes import HELDOUT_PAIRS, class_names
from clipforge.train import TrainConfig, train
from clipforge.train.report import _confusion, write_report

ZEROSHOT, RETRIEVAL = "shapes://?split=heldout", "shapes://?split=val"


@pytest.fixture
def saved_figures(monkeypatch) -> dict[str, Figure]:
    """The figures written while the test runs, by file name."""
    saved: dict[str, Figure] = {}
    original = Figure.savefig

    def keep(self, fname, *args, **kwargs):
        saved[Path(fname).name] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def short_run(out: Path, **changes) -> Path:
    config = dict(model="tiny", data="shapes://?n=64", out=str(out), steps=2, batch_size=8, warmup=1, vocab_size=600,
                  save_every=2, log_every=1, eval_samples=16, progress=False, eval_zeroshot=[ZEROSHOT],
                  eval_retrieval=RETRIEVAL)
    train(TrainConfig(**{**config, **changes}))
    return out


def by_label(figure: Figure) -> dict[str, Axes]:
    """A figure's axes by label: "classes", "colour", "shape", "similarity", "colorbar", ..."""
    return {ax.get_label(): ax for ax in figure.axes}


def one_line(text: str) -> str:
    """A label as one line: the figures wrap long captions."""
    return " ".join(text.split())


def features(model, preprocess, tokenizer, images, texts) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm image and text features in float64, normalised here (not by the model)."""
    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(im) for im in images])).double().numpy()
        txt = model.encode_text(tokenizer(texts)).double().numpy()
    return img / np.linalg.norm(img, axis=1, keepdims=True), txt / np.linalg.norm(txt, axis=1, keepdims=True)


def test_report_of_a_short_run(tmp_path, capsys, saved_figures):
    run = short_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    assert str(run / "report.md") in capsys.readouterr().out
    text = (run / "report.md").read_text()
    for name in ("curves.png", "similarity.png", "confusion-0.png", "retrieval.png"):
        assert (run / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run / "metrics.json").read_text())
    checkpoint = run / "checkpoints" / "step-0000002"
    assert f"for 2 steps of 8 pairs; checkpoint `{checkpoint}`" in text

    # The evaluation table: every number of metrics.json, and nothing else, to 4 decimals.
    table = re.findall(r"^\| `([^`]+)` \| (\S+) \| (\S+) \|$", text, flags=re.M)
    expected = [(name, key, value) for name, metrics in final["eval"].items() for key, value in metrics.items()
                if not isinstance(value, list)]
    assert {(name, key) for name, key, _ in expected} >= {(ZEROSHOT, "acc1"), (RETRIEVAL, "text_to_image_R@1")}
    assert [(name, key) for name, key, _ in table] == [(name, key) for name, key, _ in expected]
    for (_, _, shown), (name, key, value) in zip(table, expected):
        assert shown == f"{value:.4f}" and float(shown) == pytest.approx(value, abs=5e-5), (name, key)

    # The curves: loss, temperature and zero-shot accuracy, point for point from metrics.jsonl.
    loss_ax, temperature_ax, accuracy_ax = saved_figures["curves.png"].axes
    steps = [r for r in rows if "loss" in r]
    np.testing.assert_allclose(loss_ax.lines[0].get_xydata(), [(r["step"], r["loss"]) for r in steps])
    np.testing.assert_allclose(temperature_ax.lines[0].get_xydata(), [(r["step"], 1 / r["logit_scale"]) for r in steps])
    evals = [r for r in rows if "eval" in r]
    assert [line.get_label() for line in accuracy_ax.lines] == ["heldout"]
    np.testing.assert_allclose(accuracy_ax.lines[0].get_xydata(),
                               [(r["step"], r["eval"][ZEROSHOT]["acc1"]) for r in evals])
    assert evals[-1]["eval"] == final["eval"]

    # The confusion matrix: metrics.json's counts, each row divided by its total, for the
    # classes that occur; beside it the same counts summed by colour and by shape.
    confusion = by_label(saved_figures["confusion-0.png"])
    counts = np.array(final["eval"][ZEROSHOT]["confusion_matrix"], dtype=np.float64)
    present = counts.sum(1) > 0
    assert counts.sum() == 16  # eval_samples
    shares = counts[present] / counts[present].sum(1, keepdims=True)
    np.testing.assert_allclose(confusion["classes"].images[0].get_array(), shares, atol=1e-6)
    classnames = open_data(ZEROSHOT).classnames
    rows_shown = [t.get_text() for t in confusion["classes"].get_yticklabels()]
    assert rows_shown == [c for c, p in zip(classnames, present) if p]
    assert [t.get_text() for t in confusion["classes"].get_xticklabels()] == classnames
    assert present.sum() == 16 and "hence 16 × 64: these images show only the 16 colour–shape pairs held out" in text
    by_attribute = counts.reshape(8, 8, 8, 8)  # [true colour, true shape, answered colour, answered shape]
    for name, summed in (("colour", by_attribute.sum((1, 3))), ("shape", by_attribute.sum((0, 2)))):
        rows = summed[summed.sum(1) > 0]
        np.testing.assert_allclose(confusion[name].images[0].get_array(), rows / rows.sum(1, keepdims=True),
                                   atol=1e-6, err_msg=name)
    assert confusion["colorbar"].get_ylabel() == "share of the row's images"

    # The similarity matrix and the retrieval examples, recomputed from the checkpoint.
    model, preprocess, tokenizer = load(checkpoint)
    source = open_data(RETRIEVAL)
    pairs = [source[k] for k in range(10)]
    img, txt = features(model, preprocess, tokenizer, [p[0] for p in pairs], [p[1] for p in pairs])
    similarity = img @ txt.T
    similarity_axes = by_label(saved_figures["similarity.png"])
    similarity_ax = similarity_axes["similarity"]
    np.testing.assert_allclose(similarity_ax.images[0].get_array(), similarity, atol=1e-5)
    shown = np.array([float(t.get_text()) for t in similarity_ax.texts]).reshape(10, 10)
    np.testing.assert_allclose(shown, similarity, atol=0.005 + 1e-5)  # printed to 2 decimals
    assert [one_line(t.get_text()) for t in similarity_ax.get_xticklabels()] == [p[1] for p in pairs]
    # The rows are labelled with the images themselves.
    thumbnails = [np.asarray(box.offsetbox.get_data()) for box in similarity_ax.artists]
    assert len(thumbnails) == 10 and all(np.array_equal(t, np.asarray(p[0])) for t, p in zip(thumbnails, pairs))
    assert similarity_axes["colorbar"].get_ylabel() == "cosine similarity of image and caption"

    pool = [source[k][0] for k in range(256)]
    images, queries = features(model, preprocess, tokenizer, pool, [p[1] for p in pairs[:4]])
    scores = queries @ images.T  # [4, 256]
    grid = np.array(saved_figures["retrieval.png"].axes).reshape(4, 5)
    pixels = np.stack([np.asarray(im) for im in pool])
    for r in range(4):
        caption, _, note = grid[r, 0].get_ylabel().partition("\n\n")
        assert one_line(caption) == pairs[r][1]
        best = np.sort(scores[r])[::-1][:5]
        for c in range(5):
            assert float(grid[r, c].get_title()) == pytest.approx(best[c], abs=0.005 + 1e-5)
            # The image shown is one whose naive score is the c-th best (up to float32 ties).
            same = np.flatnonzero((pixels == np.asarray(grid[r, c].images[0].get_array())).all(axis=(1, 2, 3)))
            assert len(same) and np.abs(scores[r, same] - best[c]).min() < 1e-5, (r, c)
            # A green frame around the image the caption belongs to, and around no other.
            assert (grid[r, c].spines["top"].get_linewidth() == 4) == (r in same), (r, c)
        # Without a frame in the row, the note under the caption gives the image's rank.
        framed = any(grid[r, c].spines["top"].get_linewidth() == 4 for c in range(5))
        rank = re.fullmatch(r"\(its own image ranks (\d+) of 256\)", note)
        assert framed == (rank is None), (r, note)
        if rank:
            above = scores[r] - scores[r, r]
            assert 5 < int(rank[1]) and 1 + (above > 1e-5).sum() <= int(rank[1]) <= (above > -1e-5).sum()


def test_a_retrieval_set_smaller_than_the_figures_is_shown_whole(tmp_path, saved_figures):
    """Three validation pairs: a 3 × 3 similarity matrix and three queries with three images each."""
    run = short_run(tmp_path / "run", steps=1, save_every=1, eval_zeroshot=[], eval_retrieval=f"{RETRIEVAL}&n=3")
    write_report(run)
    assert saved_figures["similarity.png"].axes[0].images[0].get_array().shape == (3, 3)
    assert np.array(saved_figures["retrieval.png"].axes).size == 9
    assert "confusion-0.png" not in saved_figures


def caption_file(folder: Path) -> tuple[Path, list[Path], dict[Path, list[str]]]:
    """A TSV of seven images with one to three captions each; the third image file is corrupt and
    the fifth is not square.  Returns the file, the image paths in order, and their captions."""
    folder.mkdir()
    shapes = open_data("shapes://?split=val&n=7")
    paths, captions = [], {}
    for k in range(7):
        path = folder / f"img{k}.png"
        if k == 2:
            path.write_bytes(b"not an image at all")
        else:
            image = shapes[k][0]
            (image.resize((80, 48)) if k == 4 else image).save(path)
        paths.append(path)
        captions[path] = [shapes[k][1]] + [f"picture {k}, caption {j}" for j in range(1, 1 + k % 3)]
    rows = [(path, text) for path in paths for text in captions[path]]
    rows = rows[1::2] + rows[::2]  # an image's captions are not on consecutive lines
    csv = folder / "captions.tsv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{p.name}\t{t}\n" for p, t in rows))
    return csv, paths, captions


def test_a_caption_file_with_several_captions_and_a_corrupt_image(tmp_path, capsys, saved_figures):
    """Each readable image is shown once, with the first caption of its own; the corrupt one is
    named in the report, not raised."""
    csv, paths, captions = caption_file(tmp_path / "captions")
    run = short_run(tmp_path / "run", eval_zeroshot=[], eval_retrieval=f"csv:{csv}")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "1 unreadable image(s), e.g. img2.png (not an image Pillow can identify)" in text
    assert json.loads((run / "metrics.json").read_text())["eval"][f"csv:{csv}"]["skipped_images"] == 1

    # The images in the CSV's order of first appearance, each once; the corrupt one left out.
    lines = csv.read_text().splitlines()[1:]
    order = list(dict.fromkeys(line.split("\t")[0] for line in lines))
    first = {name: next(line.split("\t")[1] for line in lines if line.split("\t")[0] == name) for name in order}
    readable = [name for name in order if name != "img2.png"]
    assert len(readable) == 6 and sum(len(c) for c in captions.values()) > 7
    pil = {name: Image.open(csv.parent / name).convert("RGB") for name in readable}

    model, preprocess, tokenizer = load(run / "checkpoints" / "step-0000002")
    img, txt = features(model, preprocess, tokenizer, [pil[n] for n in readable], [first[n] for n in readable])
    similarity_ax = by_label(saved_figures["similarity.png"])["similarity"]
    assert [one_line(t.get_text()) for t in similarity_ax.get_xticklabels()] == [first[n] for n in readable]
    np.testing.assert_allclose(similarity_ax.images[0].get_array(), img @ txt.T, atol=1e-5)

    grid = np.array(saved_figures["retrieval.png"].axes).reshape(4, 5)
    scores = txt[:4] @ img.T  # the queries are the first captions of the first four images
    for r in range(4):
        assert one_line(grid[r, 0].get_ylabel().partition("\n\n")[0]) == first[readable[r]]
        shown = [np.asarray(grid[r, c].images[0].get_array()) for c in range(5)]
        which = [[n for n in readable if np.array_equal(np.asarray(pil[n]), s)] for s in shown]
        assert all(len(w) == 1 for w in which), r  # every image shown is one of the readable ones
        names = [w[0] for w in which]
        assert len(set(names)) == 5, names  # and none is shown twice
        ranked = np.sort(scores[r])[::-1][:5]
        np.testing.assert_allclose([scores[r, readable.index(n)] for n in names], ranked, atol=1e-5)
        # Five of the six images are shown: the caption's own image is framed, or named sixth.
        framed = [grid[r, c].spines["top"].get_linewidth() == 4 for c in range(5)]
        assert framed == [n == readable[r] for n in names], (r, names)
        note = grid[r, 0].get_ylabel().partition("\n\n")[2]
        assert note == ("" if any(framed) else "(its own image ranks 6 of 6)"), r


def test_a_confusion_matrix_says_what_its_rows_and_columns_are(tmp_path, saved_figures):
    """Three of the 48 seen shapes:// pairs against all 64 answers; then three classes of another set."""
    names = class_names()
    counts = np.zeros((64, 64), dtype=int)
    red_square, red_triangle, green_circle, green_square = (names.index(n) for n in
                                                            ("red square", "red triangle", "green circle",
                                                             "green square"))
    counts[red_square, red_square], counts[red_square, green_square] = 2, 1  # green square is held out
    counts[red_triangle, red_triangle], counts[green_circle, red_square] = 3, 2
    text = " ".join(_confusion(counts.tolist(), names, "shapes://?split=seen", tmp_path / "seen.png"))
    assert ("Rows are the 3 classes that occur among the 8 images evaluated, columns all 64 classes the model "
            "chooses among, hence 3 × 64: these images show only 3 of the 48 colour–shape pairs that training "
            "shows; the 16 columns labelled in orange are the pairs held out") in text
    figure = by_label(saved_figures["seen.png"])
    assert [t.get_text() for t in figure["classes"].get_yticklabels()] == ["red square", "red triangle", "green circle"]
    orange = [t.get_text() for t in figure["classes"].get_xticklabels() if t.get_color() == "#c04000"]
    assert sorted(orange) == sorted(f"{c} {s}" for c, s in HELDOUT_PAIRS)
    # By colour: 6 red images, 5 answered red and 1 green; 2 green images, both answered red.
    np.testing.assert_allclose(figure["colour"].images[0].get_array(), [[5 / 6, 1 / 6, *[0] * 6], [1, *[0] * 7]])
    # By shape (rows circle, square, triangle): the circles answered square, the squares square (one
    # of them with the wrong colour), the triangles triangle.
    shape = np.zeros((3, 8))
    shape[0, 1], shape[1, 1], shape[2, 2] = 1, 1, 1
    np.testing.assert_allclose(figure["shape"].images[0].get_array(), shape)

    text = " ".join(_confusion([[2, 1, 0], [0, 3, 0], [0, 0, 1]], ["cat", "dog", "bird"], "imagefolder:pets",
                               tmp_path / "pets.png"))
    assert "Rows are the 3 classes that occur among the 7 images evaluated, columns all 3 classes the model " \
           "chooses among." in text and "by colour alone" not in text
    assert set(by_label(saved_figures["pets.png"])) == {"classes", "colorbar"}
