"""Tests of the linear probe: `clipforge.evaluate.fit_linear_probe` on synthetic features whose
answer is known (and against scikit-learn's logistic regression), `evaluate_linear_probe` with
a toy model whose features name each image's class, and ``clipforge eval linear-probe`` end to
end with a tiny random-weight model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.data import DataError, open_data
from clipforge.evaluate import (
    WEIGHT_DECAYS,
    evaluate_linear_probe,
    fit_linear_probe,
    stratified_split,
    train_linear_classifier,
)

# The keys CLIP_benchmark's linear probe returns as "metrics" (clip_benchmark/metrics/linear_probe.py,
# `evaluate`), and the top-level keys of its result file (clip_benchmark/cli.py).
CLIP_BENCHMARK_METRICS = {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay", "epochs", "seed",
                          "fewshot_k", "normalized"}
CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def clusters(classes: int, per_class: int, *, dim: int = 16, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Normalised features around one random centre per class, and their labels (class-major)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=generator), dim=-1)
    return features, labels, centres


def resample(centres: torch.Tensor, per_class: int, *, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    return F.normalize(centres[labels] + noise * torch.randn(len(labels), centres.shape[1], generator=generator),
                       dim=-1), labels


def accuracy(probe, features, labels) -> float:
    return float((probe.logits(features).argmax(1) == labels).double().mean())


# ----------------------------------------------------------------------------- fitting on features


def test_separable_features_are_classified_without_error():
    features, labels, centres = clusters(6, 20, noise=0.05, seed=0)
    probe = fit_linear_probe(features, labels, 6)
    test_features, test_labels = resample(centres, 10, noise=0.05, seed=1)
    assert accuracy(probe, test_features, test_labels) == 1.0
    assert (probe.weight_decay, probe.train_size, probe.val_size, probe.search) == (0.0, 120, 0, [])


def test_accuracy_is_that_of_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    features, labels, centres = clusters(5, 80, noise=0.6, seed=2)  # overlapping classes: neither is perfect
    test_features, test_labels = resample(centres, 80, noise=0.6, seed=3)
    ours = accuracy(fit_linear_probe(features, labels, 5), test_features, test_labels)
    reference = LogisticRegression(max_iter=5000).fit(features.numpy(), labels.numpy())
    theirs = reference.score(test_features.numpy(), test_labels.numpy())
    assert 0.4 < theirs < 0.95
    assert ours == pytest.approx(theirs, abs=0.04)


def test_training_lowers_the_loss_from_clip_benchmarks_initial_layer():
    features, labels, _ = clusters(4, 25, noise=0.5, seed=4)
    # lr 1e-30: AdamW's steps are ~lr, so the classifier stays at its initialisation, which is the
    # layer CLIP_benchmark builds with torch.manual_seed(seed); nn.Linear(...)
    start = train_linear_classifier(features, labels, 4, lr=1e-30, epochs=1, seed=7)
    torch.manual_seed(7)
    reference = nn.Linear(16, 4)
    torch.testing.assert_close(start.weight, reference.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(start.bias, reference.bias, rtol=0, atol=1e-12)
    fitted = train_linear_classifier(features, labels, 4, seed=7)
    with torch.no_grad():
        before, after = (F.cross_entropy(layer(features), labels) for layer in (start, fitted))
    assert after < 0.7 * before


def test_a_seed_gives_the_same_classifier_and_leaves_the_global_random_state():
    features, labels, _ = clusters(3, 30, noise=0.4, seed=5)
    state = torch.get_rng_state()
    first, again = (train_linear_classifier(features, labels, 3, seed=1, epochs=3) for _ in range(2))
    other = train_linear_classifier(features, labels, 3, seed=2, epochs=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)


def test_features_embedded_under_inference_mode_can_be_fitted():
    features, labels, _ = clusters(3, 10, noise=0.1, seed=6)
    with torch.inference_mode():
        frozen = features.clone()
    assert accuracy(fit_linear_probe(frozen, labels, 3), features, labels) == 1.0


def test_stratified_split_holds_out_the_share_of_each_class_and_is_seeded():
    labels = torch.tensor([3] * 10 + [0] * 5 + [2] * 3 + [1])  # classes of 10, 5, 3 and 1 items
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(len(labels)))
    # floor(0.2 n + 1/2) of each class: 2 of 10, 1 of 5, 1 of 3, 0 of 1
    assert torch.bincount(labels[held], minlength=4).tolist() == [1, 0, 1, 2]
    again = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(again[1], held)
    assert any(not torch.equal(stratified_split(labels, 0.2, seed=s)[1], held) for s in range(1, 5))
    # keep: a class of one item stays on the kept side even at one half
    _, half = stratified_split(labels, 0.5, seed=0, keep=1)
    assert torch.bincount(labels[half], minlength=4).tolist() == [3, 0, 2, 5]


def clip_benchmark_peak(accuracies: dict[float, float]) -> float:
    """CLIP_benchmark's search, written out plainly over the accuracies a run recorded."""
    def peak(indices):
        best, best_acc = 0, 0.0
        for i in indices:
            if best_acc < accuracies[WEIGHT_DECAYS[i]]:
                best, best_acc = i, accuracies[WEIGHT_DECAYS[i]]
        return best

    best = peak(range(0, 97, 16))
    for span in (8, 4, 2, 1):
        best = peak([max(best - span, 0), best, min(best + span, 96)])
    return WEIGHT_DECAYS[best]


def test_the_weight_decay_search_walks_clip_benchmarks_grid():
    assert len(WEIGHT_DECAYS) == 97 and WEIGHT_DECAYS[0] == pytest.approx(1e-6) and WEIGHT_DECAYS[-1] == 100
    assert WEIGHT_DECAYS[48] == pytest.approx(1e-2)
    features, labels, _ = clusters(4, 30, noise=0.7, seed=8)
    probe = fit_linear_probe(features, labels, 4, val_proportion=0.25, epochs=4)
    tried = dict(probe.search)
    assert [wd for wd, _ in probe.search[:7]] == list(WEIGHT_DECAYS[::16])
    assert len(tried) == len(probe.search) <= 7 + 8  # each weight decay is fitted once
    assert probe.weight_decay == clip_benchmark_peak(tried)
    assert min(tried.values()) < max(tried.values())  # a weight decay of 100 cannot fit
    assert (probe.val_size, probe.train_size) == (4 * 8, 120)  # the final fit learns from all 120
    with pytest.raises(ValueError, match="not both"):
        fit_linear_probe(features, labels, 4, val_proportion=0.25, weight_decay=0.1)


def test_fewshot_keeps_k_of_each_class_and_names_a_class_with_fewer():
    features, labels, _ = clusters(3, 10, noise=0.3, seed=9)
    assert fit_linear_probe(features, labels, 3, fewshot_k=4, epochs=1).train_size == 12
    fewer = (labels != 1) | (torch.arange(30) % 10 < 6)  # class 1 keeps 6 of its 10
    with pytest.raises(ValueError, match="8-shot probing needs 8 training examples of each class; class 'b' has 6"):
        fit_linear_probe(features[fewer], labels[fewer], 3, fewshot_k=8, classnames=["a", "b", "c"])


@pytest.mark.parametrize(("features", "labels", "message"), [
    (torch.zeros(0, 4), torch.zeros(0), r"features must be \[N, D\] with N >= 1, got \[0, 4\]"),
    (torch.zeros(3, 4), torch.tensor([0, 1]), r"labels must have shape \[3\], got \[2\]"),
    (torch.zeros(3, 4), torch.tensor([0, 1, 5]), r"labels\[2\] = 5 is not a class index in \[0, 3\)"),
    (torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 1]), r"features\[1\] holds a NaN"),
])
def test_bad_features_and_labels_are_named(features, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_linear_probe(features, labels, 3)


# ----------------------------------------------------------------------------- on a data source

CLASSES = ["c0", "c1", "c2"]


def solid(path, cls: int, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (40 * cls + 10, shade, 200)).save(path)


def preprocess(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)[:, None, None]  # [3, 1, 1]


class ToyCLIP(nn.Module):
    """Features that name the class (red channel) beside a shade that varies between images (green)."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        cls = ((images[:, 0, 0, 0] - 10) / 40).round().long()
        return torch.cat([F.one_hot(cls, len(CLASSES)).float(), images[:, 1, 0, :1] / 255], dim=1)


def image_folder(root, per_class: list[int]):
    for cls, count in enumerate(per_class):
        for k in range(count):
            solid(root / CLASSES[cls] / f"{k}.png", cls, 17 * k % 255)
    return open_data(f"imagefolder:{root}")


def test_features_that_name_the_class_are_probed_without_error(tmp_path):
    train, test = image_folder(tmp_path / "train", [4, 3, 5]), image_folder(tmp_path / "test", [2, 2, 1])
    result = evaluate_linear_probe(ToyCLIP(), preprocess, train, test, ks=(1, 2))
    assert (result.metrics["acc1"], result.metrics["acc2"], result.metrics["mean_per_class_recall"]) == (1, 1, 1)
    assert result.metrics["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 1]]
    assert (result.train_images, result.test_images, result.classnames) == (12, 5, CLASSES)
    assert result.split.startswith("trained on imagefolder:")


def test_one_source_is_split_by_class_and_the_seed(tmp_path):
    data = image_folder(tmp_path / "data", [10, 5, 5])
    first = evaluate_linear_probe(ToyCLIP(), preprocess, data, split=0.2, seed=3)
    assert first.metrics["acc1"] == 1.0 and first.metrics["confusion_matrix"] == [[2, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert (first.train_images, first.test_images) == (16, 4)
    assert first.split == f"stratified split of imagefolder:{tmp_path / 'data'}: 0.2 of each class held out for " \
                          "testing, seed 3"


def test_test_classes_are_matched_by_name_and_unreadable_images_skipped(tmp_path):
    train = image_folder(tmp_path / "train", [3, 3, 3])
    # the test folder lacks c0: its c1 and c2 are the training set's classes 1 and 2, not 0 and 1
    for cls in (1, 2):
        solid(tmp_path / "test" / CLASSES[cls] / "0.png", cls, 5)
    (tmp_path / "test" / "c2" / "bad.png").write_bytes(b"no image")
    result = evaluate_linear_probe(ToyCLIP(), preprocess, train, open_data(f"imagefolder:{tmp_path / 'test'}"))
    assert result.metrics["acc1"] == 1.0 and result.metrics["confusion_matrix"] == [[0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert [s.path.rsplit("/", 1)[-1] for s in result.skipped] == ["bad.png"]


def test_bad_data_is_named_in_one_line(tmp_path):
    image_folder(tmp_path / "train", [3, 3, 3])
    (tmp_path / "train" / "c3").mkdir()
    with pytest.raises(DataError, match=r"train: class folder\(s\) 'c3' hold no image; a linear probe learns"):
        evaluate_linear_probe(ToyCLIP(), preprocess, open_data(f"imagefolder:{tmp_path / 'train'}"), split=0.5)
    image_folder(tmp_path / "extra", [1, 0, 0])
    solid(tmp_path / "extra" / "fish" / "0.png", 0, 1)
    with pytest.raises(DataError, match=r"extra: test images of class\(es\) 'fish', of which the training images"):
        evaluate_linear_probe(ToyCLIP(), preprocess, image_folder(tmp_path / "t", [2, 2, 2]),
                              open_data(f"imagefolder:{tmp_path / 'extra'}"))
    small = image_folder(tmp_path / "small", [5, 5, 2])
    with pytest.raises(DataError, match="a 0.2 test split leaves class 'c2' .2 image.s.. with no test image"):
        evaluate_linear_probe(ToyCLIP(), preprocess, small, split=0.2)
    with pytest.raises(DataError, match="a 0.9 test split leaves class 'c0' .5 image.s.. with no training image"):
        evaluate_linear_probe(ToyCLIP(), preprocess, small, split=0.9)
    few = image_folder(tmp_path / "few", [5, 5, 3])  # a 0.2 split keeps 4, 4 and 2 for training
    with pytest.raises(DataError, match="few: 3-shot probing needs 3 training examples of each class; class 'c2' has"):
        evaluate_linear_probe(ToyCLIP(), preprocess, few, split=0.2, fewshot_k=3)
    for name in ("0.png", "1.png"):  # every training image of c2 unreadable
        (tmp_path / "t" / "c2" / name).write_bytes(b"no image")
    with pytest.raises(DataError, match=r"no readable training image of class\(es\) 'c2', which the test images hold"):
        evaluate_linear_probe(ToyCLIP(), preprocess, open_data(f"imagefolder:{tmp_path / 't'}"), small)


class MeanColour(nn.Module):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def test_a_generated_split_is_probed_over_the_classes_it_shows():
    from clipforge.data.shapes import HELDOUT_PAIRS, class_names

    seen = open_data("shapes://?split=seen&n=96&size=16")  # two images of each of the 48 seen pairs
    result = evaluate_linear_probe(MeanColour(), pixels, seen, split=0.5, epochs=1)
    assert len(result.classnames) == 64 - len(HELDOUT_PAIRS) == 48
    assert set(result.classnames) < set(class_names())
    assert (result.train_images, result.test_images, result.metrics["num_classes"]) == (48, 48, 48)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from clipforge.checkpoints import load_model, save
    from clipforge.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("probe")
    for split, count in (("train", 4), ("test", 2)):
        for cls, name in enumerate(CLASSES):
            for k in range(count):
                path = root / split / name / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng(100 * cls + 10 * k + len(split))
                pixels = np.clip(60 * cls + rng.integers(0, 80, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path)
    torch.manual_seed(0)
    model = load_model("tiny")
    tokenizer = train_bpe(["a photo of a c0", "a c1", "a c2"] * 5, 520, min_frequency=1,
                          context_length=model.context_length)
    save(model, root / "tiny-model", tokenizer=tokenizer)
    return root


def probe_command(workspace, *argv: str) -> int:
    from clipforge.cli import main

    return main(["eval", "linear-probe", "--model", str(workspace / "tiny-model"), "--quiet", "--workers", "0",
                 "--batch-size", "5", *argv])


def test_command_writes_clip_benchmarks_schema_with_the_librarys_numbers(workspace, capsys):
    out = workspace / "probe.json"
    train, test = f"imagefolder:{workspace / 'train'}", f"imagefolder:{workspace / 'test'}"
    assert probe_command(workspace, "--train", train, "--test", test, "--epochs", "3", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "lp_acc1" in printed and "weight decay 0 (fixed)" in printed and "12 training and 6 test images" in printed
    result = json.loads(out.read_text())
    assert set(result) == CLIP_BENCHMARK_KEYS | {"clipforge"}
    assert set(result["metrics"]) == CLIP_BENCHMARK_METRICS
    assert (result["task"], result["dataset"], result["model"]) == ("linear_probe", test, "tiny-model")
    assert result["metrics"]["lp_acc5"] is None  # 3 classes: top-5 is undefined (CLIP_benchmark: NaN)
    assert {k: result["metrics"][k] for k in ("weight_decay", "epochs", "seed", "fewshot_k", "normalized")} == {
        "weight_decay": 0.0, "epochs": 3, "seed": 0, "fewshot_k": -1, "normalized": True}

    from clipforge.checkpoints import load

    model, preprocess, _ = load(workspace / "tiny-model")
    expected = evaluate_linear_probe(model, preprocess, open_data(train), open_data(test), epochs=3, batch_size=5)
    assert result["metrics"]["lp_acc1"] == pytest.approx(expected.metrics["acc1"], abs=1e-9)
    assert result["metrics"]["lp_mean_per_class_recall"] == pytest.approx(expected.metrics["mean_per_class_recall"])
    assert result["clipforge"]["metrics"]["confusion_matrix"] == expected.metrics["confusion_matrix"]


def test_command_splits_one_source_and_searches_the_weight_decay(workspace, capsys):
    out = workspace / "split.json"
    data = f"imagefolder:{workspace / 'train'}"
    assert probe_command(workspace, "--data", data, "--split", "0.25", "--seed", "2", "--val-proportion", "0.34",
                         "--epochs", "1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "0.25 of each class held out for testing, seed 2" in printed
    assert "chosen on a 0.34 validation share" in printed
    result = json.loads(out.read_text())
    extra = result["clipforge"]
    assert (extra["train_images"], extra["test_images"], result["dataset"]) == (9, 3, data)
    assert len(extra["weight_decay_search"]) >= 7 and result["metrics"]["seed"] == 2
    assert result["metrics"]["weight_decay"] in [row["weight_decay"] for row in extra["weight_decay_search"]]


@pytest.mark.parametrize(("argv", "message"), [
    (["--train", "imagefolder:{root}/train"], "--train needs --test"),
    (["--data", "imagefolder:{root}/train"], "needs --split F, the share of each class held out for testing"),
    (["--train", "imagefolder:{root}/train", "--split", "0.2"], "--split divides the images of --data"),
    (["--data", "imagefolder:{root}/train", "--split", "0.2", "--test", "imagefolder:{root}/test"], "not both"),
    ([], "give the images: --train URI --test URI, or --data URI --split F"),
    (["--data", "imagefolder:{root}/test", "--split", "0.2"], "with no test image"),
    (["--data", "shapes://?split=train&n=4", "--split", "0.5"], "split=train has no class labels"),
    (["--data", "csv:{root}/none.tsv", "--split", "0.5"], "no such caption file"),
    (["--train", "imagefolder:{root}/train", "--test", "imagefolder:{root}/test", "--fewshot-k", "5"],
     "5-shot probing needs 5 training examples of each class; class 'c0' has 4"),
])
def test_command_input_errors_print_one_line(workspace, capsys, argv, message):
    assert probe_command(workspace, *[a.format(root=workspace) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge eval: error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "d", "--split", "1"], "argument --split: must be between 0 and 1 (exclusive), got 1"),
    (["--data", "d", "--split", "0.2", "--weight-decay", "0.1", "--val-proportion", "0.2"],
     "argument --val-proportion: not allowed with argument --weight-decay"),
    (["--data", "d", "--split", "0.2", "--lr", "0"], "argument --lr: must be positive, got 0"),
])
def test_command_option_errors_are_argparses(workspace, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        probe_command(workspace, *argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
