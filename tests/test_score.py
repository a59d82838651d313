"""CLIPScore, RefCLIPScore and reranking: the formulas against direct computations on fixed
features (negative cosines, w = 2.5 and w = 100, torchmetrics' variant), a hand-computed
RefCLIPScore, toy models whose answers are known, and ``clipforge score`` / ``clipforge rerank``
end to end on a small folder with a corrupt image and bad caption rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _search_helpers import collection, write_pairs
from clipforge.checkpoints import load
from clipforge.cli import main
from clipforge.data.images import ImageLoader
from clipforge.data.shapes import ShapesDataset
from clipforge.score import (
    Scores,
    clip_s,
    clip_score,
    harmonic_mean,
    ref_clip_s,
    ref_clip_score,
    rerank,
)
from clipforge.transforms import image_transform


def naive_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def at_angle(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# Angles between image and caption, several past 90° (negative cosines); lengths vary, as raw features do.
ANGLES = [0.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 100.0]


def fixed_features() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    images = [at_angle(0.0, 1.0 + i) for i in range(len(ANGLES))]
    texts = [at_angle(a, 0.5 + 0.25 * i) for i, a in enumerate(ANGLES)]
    cosines = [naive_cos(i, t) for i, t in zip(images, texts)]
    return torch.tensor(images, dtype=torch.float64), torch.tensor(texts, dtype=torch.float64), cosines


# ----------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("w", [2.5, 100.0])
def test_clip_s_is_w_times_the_clamped_cosine_of_each_pair(w):
    images, texts, cosines = fixed_features()
    expected = [w * max(c, 0.0) for c in cosines]
    assert clip_s(images, texts, w=w).tolist() == pytest.approx(expected, abs=1e-5)
    assert any(c < 0 for c in cosines) and clip_s(images, texts, w=w).min() == 0
    # Random 512-d features, unnormalised: the same per-row formula.
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 512, generator=generator) * 3, torch.randn(7, 512, generator=generator)
    b[:3] = -a[:3] + 0.1 * b[:3]  # three clearly negative cosines
    expected = [w * max(naive_cos(x, y), 0.0) for x, y in zip(a.tolist(), b.tolist())]
    assert clip_s(a, b, w=w).tolist() == pytest.approx(expected, abs=1e-4)


def test_torchmetrics_clamps_the_mean_where_clipscore_clamps_each_pair():
    _, _, cosines = fixed_features()
    cos = torch.tensor(cosines)
    scores = Scores(kept=list(range(len(cos))), cosine=cos, clip_score=100 * cos.clamp(min=0), w=100)
    torchmetrics = max(100 * sum(cosines) / len(cosines), 0.0)  # torchmetrics: 100·cos, mean, then max(·, 0)
    per_pair = sum(100 * max(c, 0.0) for c in cosines) / len(cosines)
    assert scores.torchmetrics_mean == pytest.approx(torchmetrics, abs=1e-4)
    assert scores.mean == pytest.approx(per_pair, abs=1e-4)
    assert scores.mean > scores.torchmetrics_mean + 10  # the negative pairs pull only torchmetrics' mean down
    # All cosines negative: torchmetrics says 0, and so does CLIPScore; mixed with a mean below 0: only torchmetrics.
    mixed = torch.tensor([0.3, -0.5, -0.4])
    mixed_scores = Scores(kept=[0, 1, 2], cosine=mixed, clip_score=100 * mixed.clamp(min=0), w=100)
    assert mixed_scores.torchmetrics_mean == 0.0 and mixed_scores.mean == pytest.approx(10.0)
    # No negative cosine: the two agree.
    positive = torch.tensor([0.3, 0.1, 0.2])
    same = Scores(kept=[0, 1, 2], cosine=positive, clip_score=100 * positive, w=100)
    assert same.mean == pytest.approx(same.torchmetrics_mean)


def test_ref_clip_score_by_hand():
    # Image along x; caption at 60° (cos 0.5, CLIP-S = 2.5 · 0.5 = 1.25); references at 150° from
    # the x-axis (90° from the caption: cos 0) and at 90° (30° from it: cos √3/2), best √3/2.
    # RefCLIP-S = 2 · 1.25 · (√3/2) / (1.25 + √3/2) = 2.16506 / 2.11603 = 1.02317.
    # Caption 2: at 120° from its image (CLIP-S 0): RefCLIP-S 0 whatever the references.
    # Caption 3: on its image (CLIP-S 2.5), every reference at more than 90° (term 0): RefCLIP-S 0.
    images = torch.tensor([at_angle(0), at_angle(0), at_angle(0)])
    texts = torch.tensor([at_angle(60), at_angle(120), at_angle(0)])
    refs = torch.tensor([at_angle(150), at_angle(90), at_angle(120), at_angle(135), at_angle(-135)])
    owner = [0, 0, 1, 2, 2]
    got = ref_clip_s(images, texts, refs, owner)
    assert got.tolist() == pytest.approx([1.02317, 0.0, 0.0], abs=1e-5)
    assert harmonic_mean(torch.tensor([0.0]), torch.tensor([0.0])).item() == 0.0
    with pytest.raises(ValueError, match=r"caption\(s\) \[1\] have none"):
        ref_clip_s(images, texts, refs[:2], [0, 2])


# ----------------------------------------------------------------------------- toy models with known answers


class ToyModel(nn.Module):
    """Image features: an image's mean colour [B, 3]; text features: the vector VECTORS[text]."""

    config = SimpleNamespace(embed_dim=3)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


VECTORS = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "orange": [2, 1, 0], "yellow": [1, 1, 0],
           "grey": [1, 1, 1], "cyan": [0, 1, 1]}


def toy_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([VECTORS[t] for t in texts])


def solid(rgb: list[float]) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32)[:, None, None].expand(3, 4, 4).clone()


def test_model_level_scores_equal_the_hand_values():
    images = [solid([1, 0, 0]), solid([1, 0, 0]), solid([0, 1, 0])]
    texts = ["red", "orange", "blue"]  # cos 1, 2/√5, 0
    refs = [["red", "blue"], ["yellow", "green"], ["cyan", "red"]]  # best cos(text, ref): 1, 3/√10, 1/√2
    scores = ref_clip_score(ToyModel(), images, texts, refs, tokenizer=toy_tokenizer, progress=False)
    clip = [2.5, 2.5 * 2 / math.sqrt(5), 0.0]
    best = [1.0, 3 / math.sqrt(10), 1 / math.sqrt(2)]
    assert scores.kept == [0, 1, 2]
    assert scores.clip_score.tolist() == pytest.approx(clip, abs=1e-6)
    assert scores.ref_cosine.tolist() == pytest.approx(best, abs=1e-6)
    harmonic = [2 * c * b / (c + b) if c + b else 0 for c, b in zip(clip, best)]
    assert scores.ref_clip_score.tolist() == pytest.approx(harmonic, abs=1e-6)
    assert scores.mean == pytest.approx(sum(clip) / 3)
    assert scores.ref_mean == pytest.approx(float(scores.ref_clip_score.mean()))
    plain = clip_score(ToyModel(), images, texts, tokenizer=toy_tokenizer, w=100, progress=False)
    assert plain.clip_score.tolist() == pytest.approx([100 * c / 2.5 for c in clip], abs=1e-4)
    assert plain.ref_clip_score is None and plain.ref_mean is None
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        clip_score(ToyModel(), images, texts[:2], tokenizer=toy_tokenizer, progress=False)


def test_rerank_orders_by_cosine_keeps_ties_in_order_and_cuts_at_k():
    images = [solid([0, 0, 1]), solid([1, 0, 0]), solid([0.8, 0.2, 0]), solid([1, 0, 0]), solid([0, 1, 0])]
    ranking = rerank(ToyModel(), images, "red", tokenizer=toy_tokenizer, progress=False)
    assert [i for i, _ in ranking] == [1, 3, 2, 0, 4]  # the two pure reds tie: input order
    assert [c for _, c in ranking] == pytest.approx([1, 1, 0.8 / math.hypot(0.8, 0.2), 0, 0], abs=1e-6)
    assert rerank(ToyModel(), images, "red", tokenizer=toy_tokenizer, k=2, progress=False) == ranking[:2]


def test_an_image_loader_skips_unreadable_files_and_captions_follow_their_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "c.png")
    to_tensor = image_transform(4, mean=(0, 0, 0), std=(1, 1, 1))
    loader = ImageLoader([tmp_path / n for n in ("a.png", "b.png", "c.png")], to_tensor, batch_size=2)
    scores = clip_score(ToyModel(), loader, ["red", "green", "blue"], tokenizer=toy_tokenizer, progress=False)
    assert scores.kept == [0, 2] and scores.cosine.tolist() == pytest.approx([1.0, 1.0])
    assert [Path(s.path).name for s in loader.skipped] == ["b.png"]


# ----------------------------------------------------------------------------- the commands

PICKED = range(0, 42, 7)  # seen-split images of six colours, red first
NAMES = [f"{i:05d}.png" for i in PICKED]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    c = collection(tmp_path_factory)
    root = tmp_path_factory.mktemp("score")
    colours = write_pairs(root / "images", ShapesDataset(split="seen", size=32, n=48), PICKED)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG but truncated")
    shapes = {name: (root / "images" / name).with_suffix(".txt").read_text() for name in colours}
    lines = ["image\tcaption", "# one candidate caption per image", ""]
    lines += [f"{name}\t{shapes[name]}" for name in NAMES] + ["corrupt.png\ta red circle"]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    refs = [f"{name}\t{text}" for name in [*NAMES, "corrupt.png"]
            for text in ("a picture of a shape", shapes.get(name, "x"))]
    (root / "refs.tsv").write_text("\n".join(refs) + "\n")
    return {"root": root, "images": root / "images", "model": c.model, "captions": shapes, "colours": colours}


def run(*argv: str) -> int:
    return main([*argv, "--quiet", "--batch-size", "4"])


def test_score_end_to_end_matches_the_library(workspace, capsys):
    root = workspace["root"]
    code = run("score", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
               "--captions", str(root / "captions.tsv"), "--refs", str(root / "refs.tsv"),
               "--out", str(root / "scores.json"))
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((root / "scores.json").read_text())
    assert result["images_captioned"] == 7 and result["images_scored"] == 6 and result["skipped_images"] == 1
    assert [Path(s["path"]).name for s in result["skipped_examples"]] == ["corrupt.png"]
    assert "1 unreadable image(s)" in printed and "RefCLIPScore" in printed

    model, preprocess, tokenizer = load(workspace["model"])
    images = [preprocess(ShapesDataset(split="seen", size=32, n=48)[i][0]) for i in PICKED]
    texts = [workspace["captions"][name] for name in NAMES]
    refs = [["a picture of a shape", text] for text in texts]
    expected = ref_clip_score(model, images, texts, refs, tokenizer=tokenizer, progress=False)
    rows = result["per_image"]
    assert [r["image"] for r in rows] == NAMES
    assert [r["clip_score"] for r in rows] == pytest.approx(expected.clip_score.tolist(), abs=1e-5)
    assert [r["ref_clip_score"] for r in rows] == pytest.approx(expected.ref_clip_score.tolist(), abs=1e-5)
    assert result["mean"]["clip_score"] == pytest.approx(expected.mean, abs=1e-5)
    assert result["mean"]["ref_clip_score"] == pytest.approx(expected.ref_mean, abs=1e-5)
    assert result["mean"]["torchmetrics_clip_score"] == pytest.approx(expected.torchmetrics_mean, abs=1e-3)

    code = run("score", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
               "--captions", str(root / "captions.tsv"), "--w", "100", "--out", str(root / "scores.csv"))
    assert code == 0
    with open(root / "scores.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [r["image"] for r in table] == NAMES and set(table[0]) == {"image", "caption", "cosine", "clip_score"}
    assert [float(r["clip_score"]) for r in table] == pytest.approx((expected.clip_score * 40).tolist(), abs=1e-3)


@pytest.mark.parametrize(
    ("captions", "refs", "message"),
    [
        ("00000.png a red circle\n", None, "captions.tsv:1: expected IMAGE<TAB>TEXT"),
        ("00000.png\tone\n00007.png\ttwo\n00000.png\tthree\n", None, "captions.tsv:3: a second caption for 00000.png"),
        ("# header comment\n00000.png\tone\n\ttwo\n", None, "captions.tsv:3: empty image name"),
        ("00000.png\t  \n", None, "captions.tsv:1: empty caption"),
        ("00000.png\tone\n", "00000.png\tref\n00000.png\t \n", "refs.tsv:2: empty reference"),
        ("# only a comment\n", None, "captions.tsv: no IMAGE<TAB>TEXT line"),
        ("\n \n", None, "captions.tsv: empty captions file"),
        ("00000.png\tone\n00007.png\ttwo\n", "00000.png\tref\n", "refs.tsv: no reference for 00007.png"),
        ("00000.png\tone\n", "00000.png\tref\n00014.png\tref\n", "refs.tsv:2: 00014.png has no caption"),
    ],
)
def test_score_names_the_file_and_line_of_a_bad_row(workspace, tmp_path, capsys, captions, refs, message):
    (tmp_path / "captions.tsv").write_text(captions)
    argv = ["score", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
            "--captions", str(tmp_path / "captions.tsv")]
    if refs is not None:
        (tmp_path / "refs.tsv").write_text(refs)
        argv += ["--refs", str(tmp_path / "refs.tsv")]
    assert run(*argv) == 2
    assert message in capsys.readouterr().err


def test_score_stops_on_a_captions_file_that_is_not_utf8(workspace, tmp_path, capsys):
    (tmp_path / "captions.tsv").write_bytes(b"image\tcaption\n00000.png\tcaf\xe9\n")
    assert run("score", "--model", str(workspace["model"]), "--images", str(workspace["images"]),
               "--captions", str(tmp_path / "captions.tsv")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "captions.tsv:2: not UTF-8 text (invalid continuation byte at byte 27)" in err


def test_score_skips_and_lists_a_missing_image_with_its_references(workspace, tmp_path, capsys):
    # The rule every command follows: a bad image is skipped and listed, never fatal.
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in NAMES[:3]:
        (images / "sub" / name).write_bytes((workspace["images"] / name).read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG but truncated")
    names = [f"sub/{name}" for name in NAMES[:3]]
    texts = [workspace["captions"][name] for name in NAMES[:3]]
    captions = [f"{names[0]}\t{texts[0]}", "gone.png\ta picture that is not there", f"{names[1]}\t{texts[1]}",
                "corrupt.png\ta broken picture", f"{names[2]}\t{texts[2]}"]
    (tmp_path / "captions.tsv").write_text("\n".join(captions) + "\n")
    refs = [f"{name}\t{ref}" for name in [names[0], "gone.png", names[1], "corrupt.png", names[2]]
            for ref in ("a picture of a shape", "a thing")]
    (tmp_path / "refs.tsv").write_text("\n".join(refs) + "\n")
    code = run("score", "--model", str(workspace["model"]), "--images", str(images), "--captions",
               str(tmp_path / "captions.tsv"), "--refs", str(tmp_path / "refs.tsv"), "--out", str(tmp_path / "s.json"))
    printed = capsys.readouterr().out
    assert code == 0 and "3 of 5 captioned images scored; 2 unreadable image(s)" in printed
    assert "gone.png (file not found)" in printed
    result = json.loads((tmp_path / "s.json").read_text())
    assert (result["images_captioned"], result["images_scored"], result["skipped_images"]) == (5, 3, 2)
    assert [(Path(s["path"]).name, s["reason"]) for s in result["skipped_examples"]] == [
        ("gone.png", "file not found"), ("corrupt.png", "not an image Pillow can identify")]
    assert [r["image"] for r in result["per_image"]] == names

    model, preprocess, tokenizer = load(workspace["model"])
    pictures = [preprocess(ShapesDataset(split="seen", size=32, n=48)[i][0]) for i in list(PICKED)[:3]]
    expected = ref_clip_score(model, pictures, texts, [["a picture of a shape", "a thing"]] * 3,
                              tokenizer=tokenizer, progress=False)
    assert [r["ref_clip_score"] for r in result["per_image"]] == pytest.approx(expected.ref_clip_score.tolist(),
                                                                               abs=1e-5)
    assert result["mean"]["ref_clip_score"] == pytest.approx(expected.ref_mean, abs=1e-5)


def test_rerank_end_to_end_puts_the_prompted_colour_first(workspace, capsys):
    # The shared model knows colours (tests/_search_helpers.py): among the six images, the red ones lead.
    root = workspace["root"]
    red = [name for name, colour in workspace["colours"].items() if colour == "red"]
    assert red == [NAMES[0]]
    code = run("rerank", "--model", str(workspace["model"]), "--prompt", "a red circle",
               "--images", str(workspace["images"]), "-k", "4", "--out", str(root / "rerank.json"))
    printed = capsys.readouterr().out
    assert code == 0 and "1 unreadable image(s)" in printed
    result = json.loads((root / "rerank.json").read_text())
    assert [r["rank"] for r in result["ranking"]] == [1, 2, 3, 4] and result["images_ranked"] == 6
    assert result["ranking"][0]["image"] == red[0]

    model, preprocess, tokenizer = load(workspace["model"])
    images = [preprocess(ShapesDataset(split="seen", size=32, n=48)[i][0]) for i in PICKED]
    expected = rerank(model, images, "a red circle", tokenizer=tokenizer, progress=False)
    assert [r["image"] for r in result["ranking"]] == [NAMES[i] for i, _ in expected[:4]]
    assert [r["cosine"] for r in result["ranking"]] == pytest.approx([c for _, c in expected[:4]], abs=1e-5)
