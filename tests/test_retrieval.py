"""Tests for clipforge.retrieval: toy features with known answers, and the blocked computation
against a full-matrix reference that sorts every candidate list."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from clipforge.retrieval import retrieval_metrics, retrieval_ranks

# ----------------------------------------------------------------------------- references


def reference_ranks(images: torch.Tensor, texts: torch.Tensor, text_to_image: list[int]) -> tuple[list, list]:
    """Ranks by sorting each query's candidates on (score descending, negatives first): the
    1-based position of the first positive.  Images without captions get no rank."""
    scores = (images.double() @ texts.double().T).tolist()  # exact for the small-integer toy features
    n_img, n_txt = len(scores), len(text_to_image)
    text_ranks = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-scores[i][j], i == text_to_image[j]))
        text_ranks.append(1 + next(p for p, i in enumerate(order) if i == text_to_image[j]))
    image_ranks = []
    for i in range(n_img):
        positives = {j for j in range(n_txt) if text_to_image[j] == i}
        if not positives:
            continue
        order = sorted(range(n_txt), key=lambda j: (-scores[i][j], j in positives))
        image_ranks.append(1 + next(p for p, j in enumerate(order) if j in positives))
    return image_ranks, text_ranks


def reference_metrics(images, texts, text_to_image, ks) -> dict:
    image_ranks, text_ranks = reference_ranks(images, texts, text_to_image)
    out = {}
    directions = (("text_to_image", text_ranks, len(images)), ("image_to_text", image_ranks, len(texts)))
    for prefix, ranks, candidates in directions:
        for k in ks:
            out[f"{prefix}_R@{k}"] = None if k >= candidates else sum(r <= k for r in ranks) / len(ranks)
        out[f"{prefix}_mean_rank"] = statistics.mean(ranks)
        out[f"{prefix}_median_rank"] = statistics.median(ranks)
    return out


def clip_benchmark_recall(images, texts, text_to_image, k) -> tuple[float, float]:
    """CLIP_benchmark's recall@k: a hit if any positive is in torch.topk's top k (its ties are arbitrary)."""
    scores = texts @ images.T  # [texts, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.tensor(text_to_image)] = True
    def hits(s, p):
        top = s.topk(k, dim=1).indices
        return p.gather(1, top).any(1)
    t2i = hits(scores, positive).double().mean().item()
    i2t = hits(scores.T, positive.T).double().mean().item()
    return t2i, i2t


def assert_metrics_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def one_hot(indices: list[int], n: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(indices), n).float()


# ----------------------------------------------------------------------------- known answers


def test_one_hot_features_give_recall_one_and_rank_one():
    n = 7
    t2i = [i for i in range(n) for _ in range(3)]  # three captions per image
    metrics = retrieval_metrics(torch.eye(n), one_hot(t2i, n), t2i, ks=(1, 5))
    for direction in ("text_to_image", "image_to_text"):
        assert metrics[f"{direction}_R@1"] == 1.0
        assert metrics[f"{direction}_R@5"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
        assert metrics[f"{direction}_median_rank"] == 1.0


def test_known_permutation_gives_known_misses():
    # Captions describe a permuted image: images 0, 1 swapped, 2 -> 3 -> 4 -> 2 cycled, 5 and 6 fixed.
    n = 7
    permutation = [1, 0, 3, 4, 2, 5, 6]
    t2i = list(range(n))
    metrics = retrieval_metrics(torch.eye(n), one_hot(permutation, n), t2i, ks=(1, 5))
    # A moved caption scores 1 with a wrong image and 0 with every other, its own included:
    # ties go against the positive, so it ranks last (7); the two fixed ones rank 1.
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 7)
    assert metrics["text_to_image_R@5"] == pytest.approx(2 / 7)
    assert metrics["text_to_image_mean_rank"] == pytest.approx((2 * 1 + 5 * 7) / 7)
    assert metrics["text_to_image_median_rank"] == 7.0
    assert metrics["image_to_text_R@1"] == pytest.approx(2 / 7)


def test_several_captions_per_image_best_positive_counts():
    # Image 0 has captions 0 (a poor match) and 1 (the best match): one good caption is a hit.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    t2i = [0, 0, 1]
    image_ranks, text_ranks = retrieval_ranks(images, texts, t2i)
    assert image_ranks.tolist() == [1, 1]  # image 0 finds caption 1 first, though caption 0 is poor
    assert text_ranks.tolist() == [2, 1, 1]  # caption 0 prefers image 1
    metrics = retrieval_metrics(images, texts, t2i, ks=(1,))
    assert metrics["image_to_text_R@1"] == 1.0
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 3)


def test_ties_rank_negatives_first():
    # All features equal: every positive ranks after every negative.
    n_img, t2i = 4, [0, 0, 1, 2, 3, 3, 3]
    images, texts = torch.ones(n_img, 3), torch.ones(len(t2i), 3)
    image_ranks, text_ranks = retrieval_ranks(images, texts, t2i)
    assert text_ranks.tolist() == [n_img] * len(t2i)
    captions_per_image = [2, 1, 1, 3]
    assert image_ranks.tolist() == [len(t2i) - c + 1 for c in captions_per_image]
    assert retrieval_metrics(images, texts, t2i, ks=(1,))["text_to_image_R@1"] == 0.0


def test_duplicate_image_ties_with_the_positive():
    # Images 0 and 1 are identical: caption 0 (of image 0) ties them, so its rank is 2.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, text_ranks = retrieval_ranks(images, texts, [0, 2])
    assert text_ranks.tolist() == [2, 1]


def test_k_at_least_the_candidates_is_undefined():
    n = 3
    t2i = [0, 1, 2, 2]
    metrics = retrieval_metrics(torch.eye(n), one_hot(t2i, n), t2i, ks=(1, 2, 3, 4, 10))
    assert metrics["text_to_image_R@2"] == 1.0  # 3 images: k=2 still tells something
    assert metrics["text_to_image_R@3"] is None
    assert metrics["text_to_image_R@10"] is None
    assert metrics["image_to_text_R@3"] == 1.0  # 4 captions
    assert metrics["image_to_text_R@4"] is None


def test_images_without_captions_are_distractors_not_queries():
    images = torch.eye(4)
    t2i = [0, 2]  # images 1 and 3 have no caption
    texts = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # caption 0 matches distractor 1
    image_ranks, text_ranks = retrieval_ranks(images, texts, t2i)
    assert image_ranks.tolist() == [2, -1, 1, -1]
    assert text_ranks.tolist() == [4, 1]  # ties with images 0, 2, 3 at score 0, behind image 1 at 1
    metrics = retrieval_metrics(images, texts, t2i, ks=(1,))
    assert metrics["image_to_text_R@1"] == 0.5  # two queries, not four
    assert metrics["image_to_text_mean_rank"] == 1.5


def test_median_of_an_even_number_of_ranks_is_the_midpoint():
    images = torch.eye(4)
    texts = one_hot([0, 1, 3, 2], 4)  # captions 2, 3 swapped: ranks 1, 1, 4, 4
    metrics = retrieval_metrics(images, texts, [0, 1, 2, 3])
    assert metrics["text_to_image_median_rank"] == 2.5
    assert metrics["text_to_image_mean_rank"] == 2.5


# ----------------------------------------------------------------------------- against the references


def small_integer_features(n: int, d: int, seed: int) -> torch.Tensor:
    """Features whose dot products are exact in float32 and often tie."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=generator).float()


@pytest.mark.parametrize("block_size", [1, 5, 16, 64, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
def test_blocked_equals_sorted_reference_with_many_ties(block_size, shuffle):
    n_img, d = 23, 3
    generator = torch.Generator().manual_seed(1)
    t2i = torch.randint(0, n_img - 2, (61,), generator=generator)  # the last two images have no caption
    if not shuffle:
        t2i = t2i.sort().values
    images = small_integer_features(n_img, d, seed=2)
    texts = small_integer_features(len(t2i), d, seed=3)
    ks = (1, 3, 5, 10, 22, 23, 60, 61)
    got = retrieval_metrics(images, texts, t2i.tolist(), ks=ks, block_size=block_size)
    assert_metrics_equal(got, reference_metrics(images, texts, t2i.tolist(), ks))


@pytest.mark.parametrize("n_img, per_image, block_size", [(1, 1, 4), (1, 3, 2), (13, 5, 7), (37, 2, 16)])
def test_blocked_equals_reference_on_random_features(n_img, per_image, block_size):
    generator = torch.Generator().manual_seed(n_img)
    images = F.normalize(torch.randn(n_img, 16, generator=generator), dim=-1)
    t2i = [i for i in range(n_img) for _ in range(per_image)]
    # Captions near their image, so that recall is neither 0 nor 1.
    texts = F.normalize(images[t2i] + 0.9 * torch.randn(len(t2i), 16, generator=generator), dim=-1)
    ks = (1, 5, 10)
    got = retrieval_metrics(images, texts, t2i, ks=ks, block_size=block_size)
    expected = reference_metrics(images, texts, t2i, ks)
    assert_metrics_equal(got, expected)
    for k in ks:
        if k < min(n_img, len(t2i)):
            t2i_recall, i2t_recall = clip_benchmark_recall(images, texts, t2i, k)
            assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_recall)
            assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t_recall)


def test_block_size_does_not_change_the_answer():
    generator = torch.Generator().manual_seed(5)
    images = F.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(120, 8, generator=generator), dim=-1)
    t2i = torch.randint(0, 50, (120,), generator=generator).tolist()
    results = [retrieval_metrics(images, texts, t2i, block_size=b) for b in (3, 17, 50, 128, 4096)]
    for other in results[1:]:
        assert other == results[0]


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_are_named():
    images, texts = torch.eye(3), torch.eye(3)
    with pytest.raises(ValueError, match=r"text_to_image\[1\] = 3"):
        retrieval_metrics(images, texts, [0, 3, 1])
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(images, texts, [0, 1])
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(images, torch.eye(3, 4), [0, 1, 2])
    broken = texts.clone()
    broken[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"text_features\[2\]"):
        retrieval_metrics(images, broken, [0, 1, 2])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(images, texts, [0, 1, 2], ks=(0,))
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(images, texts, [0, 1, 2], block_size=0)
