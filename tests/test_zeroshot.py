"""Tests for clipforge.zeroshot, clipforge.templates and clipforge.embed: toy logits with known
answers, scikit-learn's metrics on random logits, and the classifier against CLIP_benchmark's
per-class loop on a toy model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("sklearn")  # the reference metrics (the test extra installs it)
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score  # noqa: E402

from clipforge.embed import embed_images, embed_texts
from clipforge.templates import builtin_templates, load_templates
from clipforge.zeroshot import (
    build_zeroshot_classifier,
    check_templates,
    classification_metrics,
    expand_prompts,
    zeroshot_logits,
)

# ----------------------------------------------------------------------------- classification metrics


def naive_metrics(logits: torch.Tensor, targets: list[int], ks) -> dict:
    """Loops over samples: sort classes by (logit descending, true class last among ties)."""
    n, c = logits.shape
    ranks, predicted = [], []
    for row, t in zip(logits.tolist(), targets):
        order = sorted(range(c), key=lambda j: (-row[j], j == t, j))
        ranks.append(order.index(t) + 1)
        predicted.append(order[0])
    confusion = [[0] * c for _ in range(c)]
    for t, p in zip(targets, predicted):
        confusion[t][p] += 1
    per_class = [confusion[k][k] / sum(confusion[k]) if sum(confusion[k]) else None for k in range(c)]
    present = [r for r in per_class if r is not None]
    out = {f"acc{k}": (None if k >= c else sum(r <= k for r in ranks) / n) for k in ks}
    out.update(mean_per_class_recall=sum(present) / len(present), per_class_accuracy=per_class,
               confusion_matrix=confusion, num_samples=n, num_classes=c)
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert got[key] == value, key


def test_one_hot_logits_are_all_correct():
    targets = [0, 2, 1, 2, 5, 3, 4, 0]
    logits = F.one_hot(torch.tensor(targets), 6).float()
    metrics = classification_metrics(logits, targets)
    assert metrics["acc1"] == metrics["acc5"] == metrics["mean_per_class_recall"] == 1.0
    assert metrics["per_class_accuracy"] == [1.0] * 6
    assert torch.tensor(metrics["confusion_matrix"]).diagonal().tolist() == [2, 1, 2, 1, 1, 1]


def test_known_permutation_gives_known_misses():
    # Class 1's images look like class 2 and vice versa; classes 0 and 3 are right.
    targets = [0, 1, 2, 3, 1, 1]
    looks_like = {0: 0, 1: 2, 2: 1, 3: 3}
    logits = F.one_hot(torch.tensor([looks_like[t] for t in targets]), 4).float()
    metrics = classification_metrics(logits, targets, ks=(1, 2, 3))
    assert metrics["acc1"] == pytest.approx(2 / 6)
    # The true class ties at 0 with the two other wrong classes: it ranks 4th, not 2nd.
    assert metrics["acc2"] == pytest.approx(2 / 6)
    assert metrics["acc3"] == pytest.approx(2 / 6)
    assert metrics["per_class_accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert metrics["mean_per_class_recall"] == 0.5
    assert metrics["confusion_matrix"][1] == [0, 0, 3, 0]
    assert metrics["confusion_matrix"][2] == [0, 1, 0, 0]


def test_ties_count_against_the_true_class():
    logits = torch.zeros(4, 3)
    metrics = classification_metrics(logits, [0, 1, 2, 2], ks=(1, 2))
    assert metrics["acc1"] == 0.0 and metrics["acc2"] == 0.0
    assert metrics["mean_per_class_recall"] == 0.0
    # Predicted: the lowest-index tied wrong class.
    assert metrics["confusion_matrix"] == [[0, 1, 0], [1, 0, 0], [2, 0, 0]]
    # A true class tying one other at the top is a top-1 miss and a top-2 hit.
    tie = torch.tensor([[5.0, 5.0, 1.0]])
    assert classification_metrics(tie, [1], ks=(1, 2))["acc1"] == 0.0
    assert classification_metrics(tie, [1], ks=(1, 2))["acc2"] == 1.0


def test_k_at_least_the_classes_is_undefined_not_one():
    logits = torch.randn(10, 4)
    metrics = classification_metrics(logits, torch.randint(0, 4, (10,)), ks=(1, 3, 4, 5))
    assert metrics["acc3"] is not None
    assert metrics["acc4"] is None and metrics["acc5"] is None


def test_classes_missing_from_targets_do_not_count():
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    metrics = classification_metrics(logits, [0, 1, 2])
    metrics_two = classification_metrics(logits[:2], [0, 0])
    assert metrics_two["per_class_accuracy"] == [1.0, None, None]
    assert metrics_two["mean_per_class_recall"] == 1.0
    assert metrics["mean_per_class_recall"] == pytest.approx(2 / 3)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n, c, seed", [(1, 7, 0), (97, 13, 1), (250, 2, 2), (61, 6, 3), (40, 50, 4)])
def test_agrees_with_scikit_learn_and_the_naive_loop_on_random_logits(n, c, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, c, (n,), generator=generator).tolist()
    ks = (1, 2, 5)
    metrics = classification_metrics(logits, targets, ks=ks)
    assert_same(metrics, naive_metrics(logits, targets, ks))
    predicted = logits.argmax(1).numpy()  # no ties in continuous random logits
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    for k in ks:
        if k < c and c > 2:  # scikit-learn wants 1-D scores for two classes
            expected = top_k_accuracy_score(targets, logits.numpy(), k=k, labels=list(range(c)))
            assert metrics[f"acc{k}"] == pytest.approx(expected)


def test_naive_loop_agrees_on_tied_logits():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randint(0, 3, (53, 7), generator=generator).float()  # many ties
    targets = torch.randint(0, 7, (53,), generator=generator).tolist()
    assert_same(classification_metrics(logits, targets, ks=(1, 3, 6)), naive_metrics(logits, targets, (1, 3, 6)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"targets\[2\] = 3"):
        classification_metrics(torch.zeros(3, 3), [0, 1, 3])
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        classification_metrics(torch.zeros(3, 3), [0, 1])
    logits = torch.zeros(3, 3)
    logits[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        classification_metrics(logits, [0, 1, 2])
    with pytest.raises(ValueError, match="N, C"):
        classification_metrics(torch.zeros(0, 3), [])


# ----------------------------------------------------------------------------- the classifier


class ToyTokenizer:
    """Character codes, padded: different texts give different ids."""

    def __init__(self, length: int = 24) -> None:
        self.length = length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [ord(ch) % 97 for ch in text[: self.length]]
            out[row, : len(codes)] = torch.tensor(codes)
        return out


class ToyModel(nn.Module):
    """encode_text: a bag of embedded ids; encode_image: a linear map of the mean pixel per channel."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = nn.Parameter(torch.randn(97, dim, generator=generator))
        self.projection = nn.Parameter(torch.randn(3, dim, generator=generator))
        self.calls = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inference_mode = torch.is_inference_mode_enabled()
        return self.embedding[tokens].sum(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.mean((2, 3)) @ self.projection


def clip_benchmark_classifier(model, tokenizer, classnames, templates) -> torch.Tensor:
    """CLIP_benchmark's zero_shot_classifier: one class at a time."""
    weights = []
    for name in classnames:
        texts = templates[name] if isinstance(templates, dict) else [t.replace("{c}", name) for t in templates]
        embedding = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).mean(0)
        weights.append(embedding / embedding.norm())
    return torch.stack(weights, dim=1)


@pytest.mark.parametrize("batch_size", [1, 4, 5, 1000])
def test_classifier_equals_the_per_class_loop(batch_size):
    model, tokenizer = ToyModel(), ToyTokenizer()
    classnames = ["cat", "dog", "sea otter"]
    templates = ["a photo of a {c}.", "a {c} at night.", "{c}!"]
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, batch_size=batch_size)
    expected = clip_benchmark_classifier(model, tokenizer, classnames, templates)
    assert classifier.shape == (8, 3)
    torch.testing.assert_close(classifier, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))


def test_classifier_with_per_class_prompts():
    model, tokenizer = ToyModel(), ToyTokenizer()
    templates = {"cat": ["a cat asleep.", "whiskers and a tail."], "dog": ["a dog running."], "unused": ["x"]}
    classifier = build_zeroshot_classifier(model, tokenizer, ["dog", "cat"], templates, batch_size=2)
    torch.testing.assert_close(classifier, clip_benchmark_classifier(model, tokenizer, ["dog", "cat"], templates))
    with pytest.raises(ValueError, match="no prompts for 1 class.*'bird'"):
        build_zeroshot_classifier(model, tokenizer, ["dog", "bird"], templates)


class FeatureImages(ToyModel):
    """A toy whose "images" [N, D, 1, 1] are their own features."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def test_zeroshot_end_to_end_on_toy_features():
    model, tokenizer = FeatureImages(), ToyTokenizer()
    classifier = build_zeroshot_classifier(model, tokenizer, ["a", "b", "c"], ["{c}", "one {c}"])  # [D, C]
    targets = [0, 1, 2, 2, 1]
    images = classifier.T[targets][:, :, None, None]  # each image is exactly its class embedding
    logits = zeroshot_logits(embed_images(model, images, batch_size=2, progress=False), classifier)
    assert classification_metrics(logits, targets, ks=(1,))["acc1"] == 1.0
    assert logits.diagonal().tolist() == pytest.approx([100.0] * 3)  # CLIP's scale times cosine 1
    swapped = [1, 0, 2, 2, 0]  # images 0, 1 and 4 show another class
    images = classifier.T[swapped][:, :, None, None]
    logits = zeroshot_logits(embed_images(model, images, progress=False), classifier)
    assert classification_metrics(logits, targets, ks=(1,))["acc1"] == pytest.approx(2 / 5)


def test_prompts_fill_both_placeholders_and_keep_other_braces():
    prompts, owners = expand_prompts(["cat", "{dog}"], ["a {c} {x}.", "OpenAI-style {}."])
    assert prompts == ["a cat {x}.", "OpenAI-style cat.", "a {dog} {x}.", "OpenAI-style {dog}."]
    assert owners == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "templates, message",
    [
        ([], "empty"),
        (["a photo."], r"\[0\].*no \{c\}"),
        (["a {c}", 3], r"\[1\]: expected a string"),
        ("a {c}", "got str"),
        ({"cat": []}, r"\['cat'\]: expected a non-empty list"),
        ({"cat": ["ok", " "]}, r"\['cat'\]\[1\]"),
        ({}, "empty"),
    ],
)
def test_malformed_templates_are_named(templates, message):
    with pytest.raises(ValueError, match=message):
        check_templates(templates, source="file.json")


# ----------------------------------------------------------------------------- template files


def test_shipped_templates_are_valid():
    assert {"default", "single"} <= set(builtin_templates())
    default = load_templates("default")
    assert isinstance(default, list) and len(default) >= 10 and len(set(default)) == len(default)
    assert all("{c}" in t for t in default)
    assert load_templates("single") == ["a photo of a {c}."]


def test_user_template_files(tmp_path):
    listed = tmp_path / "openai_style.json"
    listed.write_text(json.dumps(["itap of a {}.", "a photo of the {c}."]))
    assert load_templates(listed) == ["itap of a {}.", "a photo of the {c}."]
    per_class = tmp_path / "cupl.json"
    per_class.write_text(json.dumps({"cat": ["a cat."]}))
    assert load_templates(str(per_class)) == {"cat": ["a cat."]}
    broken = tmp_path / "broken.json"
    broken.write_text('[\n "a {c}",\n oops\n]')
    with pytest.raises(ValueError, match=r"broken.json:3: not valid JSON"):
        load_templates(broken)
    missing_placeholder = tmp_path / "plain.json"
    missing_placeholder.write_text('["a photo."]')
    with pytest.raises(ValueError, match=r"plain.json\[0\]"):
        load_templates(missing_placeholder)
    with pytest.raises(FileNotFoundError, match="neither a template file nor a shipped set"):
        load_templates(tmp_path / "absent.json")


# ----------------------------------------------------------------------------- embedding helpers


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], 0  # (image, label) as torchvision datasets give


def test_embed_images_accepts_datasets_batches_and_single_images():
    model = ToyModel()
    images = torch.randn(11, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = F.normalize(model.encode_image(images).detach(), dim=-1)
    sources = {
        "tensor": lambda: images,
        "dataset of (image, label)": lambda: Images(images),
        "list of images": lambda: list(images),
        "iterator of images and batches": lambda: iter([images[0], images[1:5], images[5], images[6], images[7:11]]),
    }
    for name, make in sources.items():
        for batch_size in (1, 3, 64):
            got = embed_images(model, make(), batch_size=batch_size, progress=False)
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got, expected, msg=name)


def test_embed_batches_the_model_calls_and_runs_in_inference_mode():
    model = ToyModel()
    texts = [f"caption {i}" for i in range(10)]
    model.calls = 0
    features = embed_texts(model, ToyTokenizer(), texts, batch_size=4, progress=False)
    assert model.calls == 3
    assert model.inference_mode and not features.requires_grad
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(10))
    torch.testing.assert_close(features, F.normalize(model.encode_text(ToyTokenizer()(texts)).detach(), dim=-1))


def test_embed_with_bf16_autocast_is_close_and_float32():
    """Unit-norm features through a bf16 linear layer (8-bit mantissa, ~4e-3 relative rounding):
    measured 1.7e-3 from float32; more than float32's rounding (~1e-7) shows autocast ran."""
    torch.manual_seed(0)
    model = nn.Linear(3, 6)
    model.encode_image = lambda x: model(x.mean((2, 3)))  # type: ignore[attr-defined]
    images = torch.randn(5, 3, 2, 2)
    exact = embed_images(model, images, progress=False)
    rough = embed_images(model, images, autocast_dtype=torch.bfloat16, progress=False)
    assert rough.dtype == torch.float32
    torch.testing.assert_close(rough, exact, atol=5e-3, rtol=0)
    assert (rough - exact).abs().max() > 1e-5


def test_embed_rejects_what_is_not_an_image():
    with pytest.raises(TypeError, match=r"got \[5\]"):
        embed_images(ToyModel(), [torch.zeros(5)], progress=False)
