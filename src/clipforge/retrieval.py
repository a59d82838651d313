"""Image–text retrieval metrics: recall@k and ranks, computed block by block.

    metrics = retrieval_metrics(image_features, text_features, text_to_image)
    metrics["text_to_image_R@1"], metrics["image_to_text_median_rank"]

Definitions (recall@k as CLIP_benchmark's ``zeroshot_retrieval`` computes it):

- The score of image i and caption j is ``image_features[i] · text_features[j]``, the cosine
  similarity when the features are normalised.
- Text→image: every caption j is a query; its one positive is image ``text_to_image[j]``.
- Image→text: every image that has a caption is a query; its positives are all of its captions.
  An image without any caption is a distractor for the text→image queries and not a query itself.
- The rank of a query is the 1-based rank of its best-ranked positive:
  ``1 + #(negatives whose score is >= the best positive's score)``.
- Tie rule: among equal scores, negatives are ranked before positives.  The rule is pessimistic
  on purpose: a model whose features are all equal ranks every positive last, never first.
- ``R@k`` is the fraction of queries whose rank is at most k (a hit if any positive is in the
  top k).  For k at least the number of candidates (images for text→image, captions for
  image→text) every query is a hit whatever the scores, so R@k is reported as None.
- Mean rank is the mean of the query ranks; median rank their median (the mean of the two
  middle ranks when the number of queries is even).

The full similarity matrix is never formed.  A first sweep computes the blocks that hold
positive pairs and takes each positive's score from them; a second sweep visits every block once
and counts, for both directions at once, the negatives at or above each query's best positive.
Both sweeps compute a block with the same shapes and operands, so a tie seen in one is seen in the
other.  Memory beyond the features is a few ``block_size × block_size`` buffers and O(queries)
counters.  When the captions of an image sit next to each other (the usual layout) the first
sweep touches about one block per block row and column; shuffled captions can make it a full
sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["retrieval_metrics", "retrieval_ranks"]


def _check_inputs(image_features: Tensor, text_features: Tensor, text_to_image: Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D [N, D]; got images {list(image_features.shape)}, texts {list(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image features have dimension {image_features.shape[1]}, text features {text_features.shape[1]}"
        )
    if image_features.shape[0] == 0 or text_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_to_image must hold one image index per caption ({text_features.shape[0]}), "
            f"got shape {list(text_to_image.shape)}"
        )
    bad = ((text_to_image < 0) | (text_to_image >= image_features.shape[0])).nonzero()
    if len(bad):
        j = int(bad[0])
        raise ValueError(
            f"text_to_image[{j}] = {int(text_to_image[j])} is not an image index in [0, {image_features.shape[0]})"
        )
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        # One sum is much cheaper than an elementwise check, and is finite when every value is
        # (barring an overflow to infinity, which then takes the exact path).
        if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():
            row = int((~torch.isfinite(features)).any(1).nonzero()[0])
            raise ValueError(f"{name}[{row}] holds a NaN or infinite value")


def _spans(n: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def retrieval_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Sequence[int] | Tensor,
    *,
    block_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """The 1-based rank of each query's best positive: (image→text ranks, text→image ranks).

    Image→text ranks are -1 for images without a caption (they are not queries).  See the
    module notes for the tie rule.  Computed on the features' device.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    device = image_features.device
    text_features = text_features.to(device=device, dtype=image_features.dtype)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=device)
    _check_inputs(image_features, text_features, t2i)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    image_spans, text_spans = _spans(n_img, block_size), _spans(n_txt, block_size)

    def block(bi: int, bt: int) -> Tensor:  # [image rows, text columns] of one tile
        (i0, i1), (j0, j1) = image_spans[bi], text_spans[bt]
        return image_features[i0:i1] @ text_features[j0:j1].T

    # Group the positive pairs (t2i[j], j) by the tile that holds them.
    captions = torch.arange(n_txt, device=device)
    tile = (t2i // block_size) * len(text_spans) + captions // block_size
    order = torch.argsort(tile, stable=True)
    tiles, counts = torch.unique_consecutive(tile[order], return_counts=True)
    ends = counts.cumsum(0).tolist()
    pairs = {int(key): order[end - count : end] for key, count, end in zip(tiles.tolist(), counts.tolist(), ends)}

    # Sweep 1: each positive pair's score, read from the same tile product as in sweep 2.
    positive = torch.empty(n_txt, dtype=image_features.dtype, device=device)
    for key, js in pairs.items():
        bi, bt = divmod(key, len(text_spans))
        positive[js] = block(bi, bt)[t2i[js] - image_spans[bi][0], js - text_spans[bt][0]]
    best_text = positive  # each caption has one positive
    best_image = torch.full((n_img,), -torch.inf, dtype=positive.dtype, device=device)
    best_image.scatter_reduce_(0, t2i, positive, reduce="amax")

    # Sweep 2: count everything at or above the best positive, then take the positives back out.
    above_image = torch.zeros(n_img, dtype=torch.long, device=device)
    above_text = torch.zeros(n_txt, dtype=torch.long, device=device)
    for bi, (i0, i1) in enumerate(image_spans):
        for bt, (j0, j1) in enumerate(text_spans):
            scores = block(bi, bt)
            # int32 partial sums of the masks run about twice as fast as the default int64 ones.
            above_image[i0:i1] += (scores >= best_image[i0:i1, None]).sum(1, dtype=torch.int32)
            above_text[j0:j1] += (scores >= best_text[None, j0:j1]).sum(0, dtype=torch.int32)
            js = pairs.get(bi * len(text_spans) + bt)
            if js is not None:
                rows = t2i[js]
                pair_scores = scores[rows - i0, js - j0]
                above_text[js] -= (pair_scores >= best_text[js]).long()
                above_image.index_add_(0, rows, -(pair_scores >= best_image[rows]).long())
    has_caption = torch.bincount(t2i, minlength=n_img) > 0
    image_ranks = torch.where(has_caption, above_image + 1, torch.full_like(above_image, -1))
    return image_ranks, above_text + 1


def _summary(ranks: Tensor, candidates: int, ks: Sequence[int], prefix: str) -> dict[str, float | None]:
    ranks = ranks.double().cpu()
    out: dict[str, float | None] = {}
    for k in ks:
        out[f"{prefix}_R@{k}"] = None if k >= candidates else float((ranks <= k).double().mean())
    out[f"{prefix}_mean_rank"] = float(ranks.mean())
    # torch.median returns the lower middle value; the usual median averages the two middle ranks.
    ordered = ranks.sort().values
    n = len(ordered)
    out[f"{prefix}_median_rank"] = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    return out


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Sequence[int] | Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 4096,
) -> dict[str, float | None]:
    """Recall@k, mean and median rank in both directions (definitions in the module notes).

    Args:
        image_features: [images, D], normally L2-normalised.
        text_features: [captions, D], same dimension.
        text_to_image: for each caption, the index of its image.
        ks: the k of each recall@k.
        block_size: side of the score tiles; memory grows with its square, not with the data.

    Returns keys ``text_to_image_R@{k}`` and ``image_to_text_R@{k}`` (fractions in [0, 1], None
    where k is at least the number of candidates), ``text_to_image_mean_rank``,
    ``text_to_image_median_rank``, ``image_to_text_mean_rank``, ``image_to_text_median_rank``.
    """
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image, block_size=block_size)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    metrics = _summary(text_ranks, n_img, ks, "text_to_image")
    metrics.update(_summary(image_ranks[image_ranks > 0], n_txt, ks, "image_to_text"))
    return metrics
