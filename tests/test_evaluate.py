"""Tests of clipforge.evaluate with toy models whose answers are known, and of the evaluation
protocols every data source implements.

The toy model reads an image's class from its red channel and a prompt's class from its last
word, and returns one-hot features: a correct model classifies and retrieves everything, and a
model whose text tower swaps two classes misses exactly the images of those two classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clipforge.data import CaptionedSource, DataError, LabelledSource, open_data
from clipforge.data.images import ImageLoader
from clipforge.evaluate import eval_mode, evaluate_retrieval, evaluate_zeroshot, open_eval_source

CLASSES = ["c0", "c1", "c2", "c3"]
PER_CLASS = [3, 2, 1, 2]  # images of each class in the folder


def solid(path, cls: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (40 * cls + 10, 7, 200)).save(path)


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)[:, None, None]  # [3, 1, 1]


def tokenizer(texts: list[str]) -> torch.Tensor:
    """The digit ending each text ("a photo of a c2." -> 2), as one token per text."""
    return torch.tensor([[int(text.rstrip(".")[-1])] for text in texts])


class ToyCLIP(nn.Module):
    """One-hot features: an image's class is (red - 10) / 40, a text's its token, mapped by ``text_map``."""

    def __init__(self, text_map: list[int] | None = None) -> None:
        super().__init__()
        self.text_map = torch.tensor(text_map if text_map is not None else range(len(CLASSES)))
        self.norm = nn.BatchNorm1d(len(CLASSES))  # a module with a mode of its own
        self.calls = {"image": 0, "text": 0}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        assert not self.training, "evaluation runs in eval mode"
        self.calls["image"] += 1
        cls = ((images[:, 0, 0, 0] - 10) / 40).round().long()
        return nn.functional.one_hot(cls, len(CLASSES)).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls["text"] += 1
        return nn.functional.one_hot(self.text_map[tokens[:, 0]], len(CLASSES)).float()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for cls, count in enumerate(PER_CLASS):
        for k in range(count):
            solid(root / CLASSES[cls] / f"{k}.png", cls)
    return root


def test_one_hot_features_classify_every_image(folder):
    result = evaluate_zeroshot(ToyCLIP(), preprocess, tokenizer, open_data(f"imagefolder:{folder}"),
                               templates=["a photo of a {c}.", "{c}"], ks=(1, 2))
    assert result.metrics["acc1"] == 1.0 and result.metrics["acc2"] == 1.0
    assert result.metrics["mean_per_class_recall"] == 1.0
    diagonal = [[n if i == j else 0 for j in range(4)] for i, n in enumerate(PER_CLASS)]
    assert result.metrics["confusion_matrix"] == diagonal
    assert (result.images, result.images_evaluated, result.skipped, result.prompts) == (8, 8, [], 8)
    assert result.classnames == CLASSES


def test_a_known_swap_gives_known_misses(folder):
    # the text tower swaps classes 0 and 1: their images go to each other, classes 2 and 3 stay right
    result = evaluate_zeroshot(ToyCLIP([1, 0, 2, 3]), preprocess, tokenizer, open_data(f"imagefolder:{folder}"),
                               templates=["{c}"], ks=(1, 2))
    assert result.metrics["acc1"] == pytest.approx((1 + 2) / 8)
    # a missed image scores its true class 0, tied with two other classes: ties count against it, rank 4
    assert result.metrics["acc2"] == pytest.approx(3 / 8)
    assert result.metrics["per_class_accuracy"] == [0.0, 0.0, 1.0, 1.0]
    assert result.metrics["confusion_matrix"][:2] == [[0, 3, 0, 0], [2, 0, 0, 0]]


def test_limit_takes_the_first_images_and_unreadable_ones_are_skipped(folder):
    (folder / "c0" / "1.png").write_bytes(b"no image")  # the second image, in torchvision's order
    result = evaluate_zeroshot(ToyCLIP(), preprocess, tokenizer, open_data(f"imagefolder:{folder}"),
                               templates=["{c}"], limit=4, ks=(1,))
    # the first 4 images: c0/0, c0/1 (unreadable), c0/2, c1/0
    assert (result.images, result.images_evaluated) == (4, 3)
    assert [s.path.split("/")[-2:] for s in result.skipped] == [["c0", "1.png"]]
    assert result.metrics["confusion_matrix"] == [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_classnames_and_templates_default_to_the_sources(folder):
    class Renamed:  # a labelled source with prompts of its own, built on the folder
        def __init__(self, inner):
            self.inner, self.classnames, self.templates = inner, ["x0", "x1", "x2", "x3"], ["an {c}"]

        def __len__(self):
            return len(self.inner)

        def label(self, index):
            return self.inner.label(index)

        def images(self, transform, *, batch_size=256, num_workers=0, limit=None):
            return self.inner.images(transform, batch_size=batch_size, num_workers=num_workers, limit=limit)

    source = Renamed(open_data(f"imagefolder:{folder}"))
    assert isinstance(source, LabelledSource)
    seen: list[str] = []

    def recording(texts):
        seen.extend(texts)
        return tokenizer(texts)

    result = evaluate_zeroshot(ToyCLIP(), preprocess, recording, source)
    assert seen == ["an x0", "an x1", "an x2", "an x3"] and result.metrics["acc1"] == 1.0
    seen.clear()
    evaluate_zeroshot(ToyCLIP(), preprocess, recording, source, templates=["a {c}."], classnames=CLASSES)
    assert seen == ["a c0.", "a c1.", "a c2.", "a c3."]
    with pytest.raises(ValueError, match="3 class names for the source's 4 classes"):
        evaluate_zeroshot(ToyCLIP(), preprocess, recording, source, classnames=CLASSES[:3])


# ----------------------------------------------------------------------------- retrieval


@pytest.fixture
def caption_file(tmp_path):
    """Five images (classes 0, 1, 2, 3, 0) with one to three captions each, rows interleaved."""
    classes = [0, 1, 2, 3, 0]
    for k, cls in enumerate(classes):
        solid(tmp_path / f"{k}.png", cls)
    rows = [("0.png", "c0"), ("1.png", "c1"), ("0.png", "c0"), ("2.png", "c2"), ("3.png", "c3"), ("1.png", "c1"),
            ("4.png", "c0"), ("2.png", "c2"), ("3.png", "")]
    path = tmp_path / "captions.csv"
    path.write_text("filepath,title\n" + "".join(f"{f},{c}\n" for f, c in rows))
    return path


def naive_recall(image_classes: list[int], caption_images: list[int], text_map: list[int], k: int
                 ) -> tuple[float, float]:
    """Recall@k in both directions for one-hot features, by brute force with the pessimistic tie rule."""
    img = torch.nn.functional.one_hot(torch.tensor(image_classes), 4).float()
    caption_classes = [text_map[image_classes[i]] for i in caption_images]
    txt = torch.nn.functional.one_hot(torch.tensor(caption_classes), 4).float()
    scores = img @ txt.T
    t2i = []
    for j, i in enumerate(caption_images):
        others = [scores[m, j] for m in range(len(image_classes)) if m != i]
        t2i.append(1 + sum(float(s) >= float(scores[i, j]) for s in others) <= k)
    i2t = []
    for i in sorted(set(caption_images)):
        best = max(float(scores[i, j]) for j, owner in enumerate(caption_images) if owner == i)
        above = sum(float(scores[i, j]) >= best for j, owner in enumerate(caption_images) if owner != i)
        i2t.append(1 + above <= k)
    return sum(t2i) / len(t2i), sum(i2t) / len(i2t)


def test_retrieval_of_distinct_one_hot_features_is_perfect(tmp_path):
    for k in range(4):
        solid(tmp_path / f"{k}.png", k)
    path = tmp_path / "c.csv"
    path.write_text("filepath,title\n" + "".join(f"{k}.png,c{k}\n" for k in range(4)))
    result = evaluate_retrieval(ToyCLIP(), preprocess, tokenizer, open_data(f"csv:{path}"), ks=(1, 2))
    for direction in ("text_to_image", "image_to_text"):
        assert result.metrics[f"{direction}_R@1"] == 1.0 and result.metrics[f"{direction}_mean_rank"] == 1.0
    assert (result.images, result.captions, result.captions_evaluated, result.captions_skipped) == (4, 4, 4, 0)


@pytest.mark.parametrize("text_map", [[0, 1, 2, 3], [1, 0, 2, 3]])
def test_retrieval_with_several_captions_equals_brute_force(caption_file, text_map):
    source = open_data(f"csv:{caption_file}")
    result = evaluate_retrieval(ToyCLIP(text_map), preprocess, tokenizer, source, ks=(1, 2, 3))
    images = [0, 1, 2, 3, 0]  # image k shows class images[k]
    owners = [0, 1, 0, 2, 3, 1, 4, 2]  # the file's non-empty captions, in order
    for k in (1, 2, 3):
        t2i, i2t = naive_recall(images, owners, text_map, k)
        assert result.metrics[f"text_to_image_R@{k}"] == pytest.approx(t2i), k
        assert result.metrics[f"image_to_text_R@{k}"] == pytest.approx(i2t), k
    assert result.captions_skipped == 1  # the empty caption
    if text_map == [0, 1, 2, 3]:  # images 0 and 4 look alike: their captions tie, and ties count against
        assert result.metrics["text_to_image_R@1"] == pytest.approx(5 / 8)


def test_retrieval_limit_keeps_the_captions_of_the_first_images_and_drops_unreadable_ones(caption_file):
    (caption_file.parent / "1.png").write_bytes(b"broken")
    source = open_data(f"csv:{caption_file}")
    assert source.caption_index(limit=3) == (["c0", "c1", "c0", "c2", "c1", "c2"], [0, 1, 0, 2, 1, 2], 1)
    result = evaluate_retrieval(ToyCLIP(), preprocess, tokenizer, source, limit=3, ks=(1,))
    # images 0 and 2 remain, each with two captions, and nothing ties: perfect recall
    assert (result.images, result.images_evaluated, result.captions, result.captions_evaluated) == (3, 2, 6, 4)
    assert [s.path.rsplit("/", 1)[-1] for s in result.skipped] == ["1.png"]
    assert result.metrics["text_to_image_R@1"] == 1.0 and result.metrics["image_to_text_R@1"] == 1.0


# ----------------------------------------------------------------------------- modes and random state


def test_each_module_keeps_its_own_mode():
    model = ToyCLIP()
    model.train()
    model.norm.eval()  # a frozen part, as lock_image leaves the image tower
    with eval_mode(model):
        assert not model.training and not model.norm.training
    assert model.training and not model.norm.training
    model.eval()
    model.norm.train()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("the modes come back on errors too")
    assert not model.training and model.norm.training


def test_evaluation_restores_modes_and_leaves_the_global_random_state(folder):
    model = ToyCLIP().train()
    model.norm.eval()
    before = torch.get_rng_state()
    evaluate_zeroshot(model, preprocess, tokenizer, open_data(f"imagefolder:{folder}"), templates=["{c}"])
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and not model.norm.training


def test_image_loader_leaves_the_global_random_state(folder):
    loader = open_data(f"imagefolder:{folder}").images(preprocess, batch_size=3)
    before = torch.get_rng_state()
    assert sum(len(batch) for batch in loader) == 8
    assert torch.equal(torch.get_rng_state(), before)


def test_generated_images_are_those_the_source_draws():
    shapes = open_data("shapes://?split=heldout&n=5&size=24")
    digits = open_data("digits://?split=test&size=12")
    for source in (shapes, digits):
        loader = source.images(lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), limit=3)
        assert isinstance(loader, ImageLoader)
        batch = torch.cat(list(loader))
        expected = torch.stack([torch.from_numpy(np.asarray(source[k][0]).copy()).permute(2, 0, 1) for k in range(3)])
        assert torch.equal(batch, expected) and loader.kept == [0, 1, 2]
        assert source.caption_index(limit=3) == ([source[k][1] for k in range(3)], [0, 1, 2], 0)


def test_read_errors_are_skipped_only_when_they_mean_bad_data():
    def read(k: int) -> Image.Image:
        if k == 1:
            raise OSError("unreadable")
        return Image.new("RGB", (2, 2), (k, 0, 0))

    loader = ImageLoader([0, 1, 2], preprocess, read=read)
    assert [float(x) for x in torch.cat(list(loader))[:, 0, 0, 0]] == [0.0, 2.0]
    assert loader.kept == [0, 2] and [(s.path, s.reason) for s in loader.skipped] == [("1", "OSError: unreadable")]
    with pytest.raises(OSError, match="unreadable"):  # a generated source: every error is a bug
        list(ImageLoader([0, 1, 2], preprocess, read=read, read_errors=()))


# ----------------------------------------------------------------------------- the protocols


def test_every_source_is_an_evaluation_source_of_its_kind(folder, caption_file, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    solid(pairs / "a.png", 1)
    (pairs / "a.txt").write_text("c1")
    kinds = {
        f"imagefolder:{folder}": (True, False),
        f"csv:{caption_file}": (False, True),
        f"pairs:{pairs}": (False, True),
        "shapes://?split=heldout&n=4": (True, True),
        "digits://?split=test": (True, True),
    }
    for uri, (labelled, captioned) in kinds.items():
        source = open_data(uri)
        assert (isinstance(source, LabelledSource), isinstance(source, CaptionedSource)) == (labelled, captioned), uri
    shapes = open_data("shapes://?split=seen&n=50")
    shown = shapes.objects(49)[0]
    assert shapes.classnames[shapes.label(49)] == f"{shown.colour} {shown.shape}"
    assert open_data("digits://?split=test").templates[0].count("{c}") == 1


@pytest.mark.parametrize("uri, task, message", [
    ("shards:/nowhere/{{0..1}}.tar", "zeroshot", "a streamed source is no evaluation source"),
    ("shards:/nowhere/{{0..1}}.tar", "retrieval", "a streamed source is no evaluation source"),
    ("csv:{captions}", "zeroshot", "has no class labels"),
    ("imagefolder:{folder}", "retrieval", "has no captions"),
])
def test_sources_that_cannot_serve_a_task_are_refused_in_one_line(folder, caption_file, uri, task, message):
    with pytest.raises(DataError, match=message) as err:
        open_eval_source(uri.format(folder=folder, captions=caption_file), task)
    assert "\n" not in str(err.value)


def test_a_split_without_labels_fails_before_any_image_is_embedded():
    model = ToyCLIP()
    with pytest.raises(DataError, match=r"split=val has no class labels"):
        evaluate_zeroshot(model, preprocess, tokenizer, open_data("shapes://?split=val&n=4"), templates=["{c}"])
    assert model.calls["image"] == 0


def test_pairs_captions_that_are_empty_are_skipped_and_not_utf8_is_an_error(tmp_path):
    """An empty caption leaves its image as a distractor; a caption file that is not UTF-8 is bad
    text input, an error naming the file and byte (docs/evaluation.md, "Unreadable input")."""
    for k, caption in enumerate([b"c0", b"c1", b"  ", b"c3"]):
        solid(tmp_path / f"{k}.png", k)
        (tmp_path / f"{k}.txt").write_bytes(caption)
    source = open_data(f"pairs:{tmp_path}")
    assert source.caption_index() == (["c0", "c1", "c3"], [0, 1, 3], 1)
    result = evaluate_retrieval(ToyCLIP(), preprocess, tokenizer, source, ks=(1,))
    # image 2 stays as a distractor; the three captions still find their images first
    assert (result.images, result.captions_evaluated, result.captions_skipped) == (4, 3, 1)
    assert result.metrics["text_to_image_R@1"] == 1.0 and result.metrics["image_to_text_R@1"] == 1.0
    (tmp_path / "1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"1\.txt:1: not UTF-8 text"):
        open_data(f"pairs:{tmp_path}").caption_index()
