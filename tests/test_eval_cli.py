"""End-to-end tests of ``clipforge eval``: a random-weight tiny model on a generated image folder
and caption file; the JSON must hold the library's numbers for the same features."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.checkpoints import load, load_model, save
from clipforge.cli import main
from clipforge.data import read_captions, scan_image_folder
from clipforge.embed import embed_images, embed_texts
from clipforge.retrieval import retrieval_metrics
from clipforge.templates import load_templates
from clipforge.tokenizer import train_bpe
from clipforge.zeroshot import build_zeroshot_classifier, classification_metrics, zeroshot_logits

CLASSES = ["bird", "cat", "dog"]
CAPTIONS = {
    "bird/0.png": ["a small bird on a branch", "a bird singing"],
    "bird/1.png": ["a blue bird"],
    "cat/0.png": ["a cat asleep", "a grey cat on a sofa"],
    "cat/1.png": ["a kitten playing"],
    "dog/0.png": ["a dog running on grass"],
    "dog/1.png": ["a brown dog", "a dog with a ball", "a puppy"],
}


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels = np.clip(base + rng.integers(-30, 30, (20, 24, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    folder = root / "images"
    for seed, name in enumerate(CAPTIONS):
        write_png(folder / name, seed)
    write_png(folder / "dog" / "2.png", 10)
    (folder / "cat" / "corrupt.jpg").write_bytes(b"not really a jpeg")
    os.symlink(folder / "gone.png", folder / "dog" / "missing.png")
    rows = ["filepath\ttitle"]
    rows += [f"images/{name}\t{caption}" for name, captions in CAPTIONS.items() for caption in captions]
    rows += ["images/cat/corrupt.jpg\ta corrupt picture", "images/nowhere.png\ta missing picture",
             "images/dog/2.png\t ", "images/dog/2.png\ta dog, shown in a third picture"]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    # A tiny model saved with a tokenizer trained on the words it will see (its vocabulary is not OpenAI's).
    torch.manual_seed(0)
    model = load_model("tiny")
    corpus = [c for captions in CAPTIONS.values() for c in captions] + [t for t in load_templates("default")]
    tokenizer = train_bpe(corpus * 3 + CLASSES, 600, min_frequency=1, context_length=model.context_length)
    save(model, root / "tiny-model", tokenizer=tokenizer)
    tokenizer.save(root / "tokenizer")
    return {"root": root, "folder": folder, "captions": root / "captions.tsv", "model": root / "tiny-model",
            "tokenizer": root / "tokenizer"}


def run(*argv: str) -> int:
    return main(["eval", *argv, "--quiet", "--workers", "0", "--batch-size", "4"])


def assert_close_dict(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_zeroshot_end_to_end(workspace, capsys):
    out = workspace["root"] / "zeroshot.json"
    templates = workspace["root"] / "templates.json"
    templates.write_text(json.dumps(["a photo of a {c}.", "a picture of the {c}.", "OpenAI's placeholder: {}."]))
    code = run("zeroshot", "--model", str(workspace["model"]), "--data", f"imagefolder:{workspace['folder']}",
               "--templates", str(templates), "--out", str(out))
    printed = capsys.readouterr().out
    assert code == 0
    text = out.read_text()
    result = json.loads(text)
    assert "NaN" not in text  # json.loads would accept NaN; CLIP_benchmark-readers may not
    assert result.keys() == {"dataset", "model", "pretrained", "task", "metrics", "language", "clipforge"}
    assert result["task"] == "zeroshot_classification" and result["language"] == "en"
    assert result["model"] == "tiny-model" and result["pretrained"] == str(workspace["model"])
    assert result["dataset"] == f"imagefolder:{workspace['folder']}"
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["metrics"]["acc5"] is None  # 3 classes: top-5 is undefined
    extra = result["clipforge"]
    assert extra["images"] == 9 and extra["images_evaluated"] == 7 and extra["skipped_images"] == 2
    assert {Path(s["path"]).name for s in extra["skipped_examples"]} == {"corrupt.jpg", "missing.png"}
    assert extra["classes"] == CLASSES and extra["prompts"] == 9
    assert "2 unreadable image(s)" in printed and "acc1" in printed and "n/a" in printed

    # The library on the same model and images gives the same numbers.
    model, preprocess, tokenizer = load(workspace["model"])
    folder = scan_image_folder(workspace["folder"])
    loader = folder.images(preprocess, batch_size=4)
    features = embed_images(model, loader, batch_size=4, progress=False)
    classifier = build_zeroshot_classifier(model, tokenizer, CLASSES, load_templates(templates), batch_size=4)
    targets = [folder.targets[i] for i in loader.kept]
    expected = classification_metrics(zeroshot_logits(features, classifier), targets)
    assert_close_dict(result["metrics"], {k: expected[k] for k in ("acc1", "acc5", "mean_per_class_recall")})
    library = {**expected, "per_class_accuracy": dict(zip(CLASSES, expected["per_class_accuracy"]))}
    assert_close_dict(extra["metrics"], library)
    assert sum(map(sum, extra["metrics"]["confusion_matrix"])) == 7


def test_retrieval_end_to_end(workspace, capsys):
    out = workspace["root"] / "retrieval.json"
    code = run("retrieval", "--model", str(workspace["model"]), "--data", f"csv:{workspace['captions']}",
               "--recall-k", "1", "2", "5", "--block-size", "3", "--out", str(out))
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_retrieval"
    assert set(result["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 5)}
    extra = result["clipforge"]
    assert extra["images"] == 9 and extra["images_evaluated"] == 7 and extra["skipped_images"] == 2
    assert extra["captions"] == 13 and extra["captions_evaluated"] == 11 and extra["empty_captions_skipped"] == 1
    assert "text→image" in printed and "mean rank" in printed

    model, preprocess, tokenizer = load(workspace["model"])
    pairs = read_captions(workspace["captions"])
    loader = pairs.images(preprocess, batch_size=4)
    image_features = embed_images(model, loader, batch_size=4, progress=False)
    kept = pairs.select_images(loader.kept)
    text_features = embed_texts(model, tokenizer, kept.captions, batch_size=4, progress=False)
    expected = retrieval_metrics(image_features, text_features, kept.text_to_image, ks=(1, 2, 5))
    assert_close_dict(extra["metrics"], expected)
    assert expected["text_to_image_R@5"] is not None and expected["image_to_text_R@5"] is not None
    for k in (1, 2, 5):
        assert result["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(expected[f"text_to_image_R@{k}"])
        assert result["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(expected[f"image_to_text_R@{k}"])


def test_preset_model_with_a_tokenizer_folder(workspace, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = run("retrieval", "--model", "tiny", "--tokenizer", str(workspace["tokenizer"]),
               "--data", f"csv:{workspace['captions']}", "--dataset-name", "toy", "--precision", "bf16",
               "--out", str(out))
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["pretrained"] == "random-init" and result["dataset"] == "toy"
    assert result["clipforge"]["precision"] == "bf16"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["zeroshot", "--model", "tiny", "--data", "imagefolder:{folder}"], "tokenizer folder (--tokenizer DIR"),
        (["zeroshot", "--model", "{model}", "--data", "imagefolder:{root}/absent"], "absent: not a folder"),
        (["zeroshot", "--model", "{model}", "--data", "csv:{captions}"], "cannot use"),
        (["zeroshot", "--model", "{model}", "--data", "{folder}"], "known scheme"),
        (["zeroshot", "--model", "{model}", "--data", "imagefolder:{folder}", "--templates", "{captions}"],
         "captions.tsv:1: not valid JSON"),
        (["zeroshot", "--model", "{model}", "--data", "imagefolder:{folder}", "--classnames", "{root}/names.txt"],
         "2 class names for 3 class folders"),
        (["retrieval", "--model", "{root}/nothing", "--data", "csv:{captions}"], "neither an existing file"),
        (["retrieval", "--model", "{model}", "--data", "csv:{captions}", "--caption-key", "text"],
         "no caption column 'text'"),
        (["zeroshot", "--model", "{model}", "--data", "shards:{root}/x.tar"], "no evaluation source"),
        (["retrieval", "--model", "{model}", "--data", "shards:{root}/x.tar"], "no evaluation source"),
        (["zeroshot", "--model", "{model}", "--data", "shapes://?split=train&n=4"], "split=train has no class labels"),
        (["retrieval", "--model", "{model}", "--data", "imagefolder:{folder}"], "has no captions"),
        (["retrieval", "--model", "{model}", "--data", "shapes://?split=val", "--image-key", "x"],
         "does not take these options"),
    ],
)
def test_input_errors_print_one_line_and_return_2(workspace, capsys, argv, message):
    (workspace["root"] / "names.txt").write_text("a bird\na cat\n")
    argv = [a.format(**workspace) for a in argv]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("clipforge eval: error:") and len(err.strip().splitlines()) == 1


def test_classnames_file_renames_the_classes(workspace, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"bird": "small bird", "cat": "house cat", "dog": "dog"}))
    out = tmp_path / "z.json"
    assert run("zeroshot", "--model", str(workspace["model"]), "--data", f"imagefolder:{workspace['folder']}",
               "--classnames", str(names), "--templates", "single", "--topk", "1", "2", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["clipforge"]["classes"] == ["small bird", "house cat", "dog"]
    assert result["clipforge"]["prompts"] == 3
    assert set(result["metrics"]) == {"acc1", "acc2", "mean_per_class_recall"}


# ----------------------------------------------------------------------------- generated and pairs: sources


def test_zeroshot_on_generated_shapes_uses_their_classes_and_prompts(workspace, tmp_path):
    from clipforge.data.shapes import ShapesDataset, class_names

    out = tmp_path / "shapes.json"
    uri = "shapes://?split=heldout&n=40&size=32"
    assert run("zeroshot", "--model", str(workspace["model"]), "--data", uri, "--limit", "24", "--out", str(out)) == 0
    result = json.loads(out.read_text())
    extra = result["clipforge"]
    assert extra["classes"] == class_names() and extra["templates"] == "the data's own"
    assert extra["prompts"] == 64 * len(ShapesDataset.templates)
    assert (extra["images"], extra["images_evaluated"], extra["skipped_images"]) == (24, 24, 0)

    model, preprocess, tokenizer = load(workspace["model"])
    shapes = ShapesDataset(split="heldout", n=40, size=32)
    images = torch.stack([preprocess(shapes[k][0]) for k in range(24)])
    classifier = build_zeroshot_classifier(model, tokenizer, class_names(), list(ShapesDataset.templates))
    features = embed_images(model, images, batch_size=4, progress=False)
    expected = classification_metrics(zeroshot_logits(features, classifier), [shapes.label(k) for k in range(24)])
    assert_close_dict(result["metrics"], {k: expected[k] for k in ("acc1", "acc5", "mean_per_class_recall")})
    assert extra["metrics"]["confusion_matrix"] == expected["confusion_matrix"]


def test_zeroshot_on_digits_with_a_template_set(workspace, tmp_path):
    out = tmp_path / "digits.json"
    assert run("zeroshot", "--model", str(workspace["model"]), "--data", "digits://?split=test&size=16",
               "--limit", "20", "--templates", "single", "--out", str(out)) == 0
    extra = json.loads(out.read_text())["clipforge"]
    assert extra["classes"][:3] == ["zero", "one", "two"] and extra["prompts"] == 10 and extra["templates"] == "single"
    assert extra["images_evaluated"] == 20 and sum(map(sum, extra["metrics"]["confusion_matrix"])) == 20


@pytest.mark.parametrize("kind", ["pairs", "shapes"])
def test_retrieval_on_pairs_and_generated_shapes(workspace, tmp_path, kind):
    from clipforge.data.shapes import ShapesDataset

    if kind == "pairs":
        folder = tmp_path / "pairs"
        for seed, (name, captions) in enumerate(CAPTIONS.items()):
            write_png(folder / name, seed)
            (folder / name).with_suffix(".txt").write_text(captions[0])
        uri = f"pairs:{folder}"
        images = [Image.open(folder / name).convert("RGB") for name in sorted(CAPTIONS)]
        captions = [CAPTIONS[name][0] for name in sorted(CAPTIONS)]
    else:
        uri = "shapes://?split=val&n=12&size=32"
        shapes = ShapesDataset(split="val", n=12, size=32)
        images, captions = [shapes[k][0] for k in range(12)], [shapes[k][1] for k in range(12)]
    out = tmp_path / "r.json"
    assert run("retrieval", "--model", str(workspace["model"]), "--data", uri, "--recall-k", "1", "3",
               "--out", str(out)) == 0
    extra = json.loads(out.read_text())["clipforge"]
    assert extra["images_evaluated"] == extra["captions_evaluated"] == len(images)

    model, preprocess, tokenizer = load(workspace["model"])
    image_features = embed_images(model, torch.stack([preprocess(im) for im in images]), progress=False)
    text_features = embed_texts(model, tokenizer, captions, progress=False)
    expected = retrieval_metrics(image_features, text_features, list(range(len(images))), ks=(1, 3))
    assert_close_dict(extra["metrics"], expected)


@pytest.mark.parametrize("name, count", [("zh", 16), ("zh-single", 1)])
def test_chinese_template_sets_are_shipped_and_fill_chinese_class_names(name, count):
    from clipforge.templates import builtin_templates, load_templates
    from clipforge.zeroshot import expand_prompts

    assert name in builtin_templates()
    templates = load_templates(name)
    prompts, owners = expand_prompts(["红色的猫", "狗"], templates)
    assert len(prompts) == 2 * count and owners == [0] * count + [1] * count
    assert prompts[0] == "一张红色的猫的照片。" and all("{" not in p for p in prompts)
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts)
