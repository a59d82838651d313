"""CLIPScore and RefCLIPScore (Hessel et al., 2021), and best-of-N reranking of images for a prompt.

    scores = clip_score(model, images, captions, tokenizer=tokenizer)          # a `Scores`
    scores.mean                                       # CLIP-S averaged over the images
    scores = ref_clip_score(model, images, captions, refs, tokenizer=tokenizer)
    scores.ref_mean                                   # RefCLIP-S averaged
    best = rerank(model, images, "a red circle", tokenizer=tokenizer, k=4)   # [(index, cosine), ...]

``images`` is anything `clipforge.embed.embed_images` takes: preprocessed tensors [3, H, W]
(the model's own ``preprocess``), batches, or an `ImageLoader`, whose unreadable files are
skipped; `Scores.kept` then lists the images that were scored, and each caption follows its
image.

Definitions (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
Captioning", section 3), with c the caption's embedding, v the image's and R the references':

- CLIP-S(c, v) = w · max(cos(c, v), 0), per pair, with w = 2.5 (the paper's rescaling: the
  authors saw CLIP ViT-B/32 give captions cosines from about 0 to 0.4);
  the reported CLIPScore is the mean of CLIP-S over the pairs.
- RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r ∈ R} cos(c, r), 0)), the harmonic
  mean of the image term (w included) and the clamped best cosine to a reference caption.
  A harmonic mean with a zero term is 0 here (the limit), where the authors' script divides
  0 by 0.  Their script also leaves the reference term unclamped; the two differ only when
  every reference's cosine is negative.
- torchmetrics' ``CLIPScore`` computes 100 · cos per pair, averages, and clamps the *mean*
  at 0: max(100 · mean(cos), 0).  With w = 100, `clip_score` clamps *each pair* first, so the
  two agree when no cosine is negative and otherwise this one is higher.
  `Scores.torchmetrics_mean` gives torchmetrics' number for the same pairs.

These are CLIP's definitions, on the cosine, and apply to any model alike; w = 2.5 was fitted
to CLIP's cosines.  A SigLIP model (a sigmoid model: `clipforge.zeroshot.is_sigmoid_model`)
also gives each pair a calibrated probability, sigmoid(scale · cos + bias) with its own learned
scale and bias (`match_probability`; `Scores.probability`): the chance, as the sigmoid loss
trained it, that the caption describes the image.  A softmax model has no such per-pair
probability (its softmax needs the competing captions), so it is None there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.embed import embed_images, embed_texts
from clipforge.zeroshot import is_sigmoid_model

__all__ = [
    "CLIP_SCORE_W",
    "Scores",
    "clip_s",
    "clip_score",
    "harmonic_mean",
    "match_probability",
    "ref_clip_s",
    "ref_clip_score",
    "rerank",
]

CLIP_SCORE_W = 2.5  # Hessel et al., 2021, section 3
# torchmetrics.multimodal.CLIPScore's weight, max(100 * cos, 0): a CLIP-S weight on the cosine, not a logit scale.
TORCHMETRICS_W = 100.0


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of two [N, D] feature sets, float32."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def clip_s(image_features: Tensor, text_features: Tensor, *, w: float = CLIP_SCORE_W) -> Tensor:
    """CLIP-S of each pair [N]: w · max(cos(image_i, text_i), 0); features need not be normalised."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must both be [N, D], got {list(image_features.shape)} and "
            f"{list(text_features.shape)}"
        )
    return w * _cosine(image_features, text_features).clamp(min=0)


@torch.no_grad()
def match_probability(model: nn.Module, cosine: Tensor) -> Tensor | None:
    """sigmoid(scale · cos + bias) of each cosine, float32, with the model's own learned scale and
    bias: a SigLIP model's probability that a text fits an image; None for a softmax model (CLIP)."""
    if not is_sigmoid_model(model):
        return None
    scale = model.logit_scale().float().to(cosine.device)
    return torch.sigmoid(scale * cosine.float() + model.logit_scale.bias.float().to(cosine.device))


def harmonic_mean(a: Tensor, b: Tensor) -> Tensor:
    """2ab / (a + b) element-wise for non-negative a and b; 0 where a + b is 0."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / torch.where(total > 0, total, 1), torch.zeros_like(total))


def _best_reference_cosine(text_features: Tensor, ref_features: Tensor, ref_owner: Tensor) -> Tensor:
    """max over each caption's references of cos(caption, reference) [N]."""
    n = len(text_features)
    if ref_owner.ndim != 1 or len(ref_owner) != len(ref_features):
        raise ValueError(f"ref_owner must hold one caption index per reference ({len(ref_features)}), "
                         f"got shape {list(ref_owner.shape)}")
    if len(ref_owner) and (int(ref_owner.min()) < 0 or int(ref_owner.max()) >= n):
        raise ValueError(f"ref_owner must hold caption indices in [0, {n})")
    counts = torch.bincount(ref_owner.cpu(), minlength=n)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"every caption needs at least one reference; caption(s) {missing[:5]} have none")
    cos = _cosine(text_features[ref_owner], ref_features)  # [R]
    best = torch.full((n,), -torch.inf, device=cos.device)
    return best.scatter_reduce(0, ref_owner.to(cos.device), cos, reduce="amax")


def ref_clip_s(
    image_features: Tensor,
    text_features: Tensor,
    ref_features: Tensor,
    ref_owner: Tensor | Sequence[int],
    *,
    w: float = CLIP_SCORE_W,
) -> Tensor:
    """RefCLIP-S of each caption [N]: the harmonic mean of CLIP-S and the clamped best cosine
    between the caption and its references.

    ``ref_features`` [R, D] holds every reference, ``ref_owner`` [R] the caption each belongs to.
    """
    owner = torch.as_tensor(ref_owner, dtype=torch.long)
    best = _best_reference_cosine(text_features, ref_features, owner)
    return harmonic_mean(clip_s(image_features, text_features, w=w), best.clamp(min=0))


@dataclass(frozen=True)
class Scores:
    """Per-image scores of captioned images; every tensor holds one value per image scored."""

    kept: list[int]  # index (into the images given) of each image scored; unreadable ones are left out
    cosine: Tensor  # [K] cos(image, caption)
    clip_score: Tensor  # [K] CLIP-S = w · max(cos, 0)
    w: float  # the CLIP-S weight
    ref_cosine: Tensor | None = None  # [K] max over the image's references of cos(caption, reference)
    ref_clip_score: Tensor | None = None  # [K] RefCLIP-S
    probability: Tensor | None = None  # [K] a SigLIP model's sigmoid(scale · cos + bias); None for CLIP

    @property
    def mean(self) -> float:
        """CLIPScore: CLIP-S averaged over the images scored."""
        return float(self.clip_score.double().mean())

    @property
    def ref_mean(self) -> float | None:
        """RefCLIPScore: RefCLIP-S averaged, or None without references."""
        return None if self.ref_clip_score is None else float(self.ref_clip_score.double().mean())

    @property
    def torchmetrics_mean(self) -> float:
        """torchmetrics' ``CLIPScore`` of the same pairs: max(100 · mean(cos), 0)."""
        return max(TORCHMETRICS_W * float(self.cosine.double().mean()), 0.0)


def _kept(images: Any, count: int) -> list[int]:
    """Indices of the images embedded: an `ImageLoader` records them, else all."""
    kept = getattr(images, "kept", None)
    return list(kept) if isinstance(kept, list) else list(range(count))


def clip_score(
    model: nn.Module,
    images: Iterable[Any],
    texts: Sequence[str],
    *,
    tokenizer: Callable[[list[str]], Tensor],
    refs: Sequence[Sequence[str]] | None = None,
    w: float = CLIP_SCORE_W,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Scores:
    """CLIP-S of each image with its caption, and their mean (`Scores.mean`); with ``refs``,
    RefCLIP-S too (see `ref_clip_score`).

    Args:
        model: a CLIP model (``encode_image``, ``encode_text``).
        images: preprocessed images as `embed_images` takes them; an `ImageLoader` skips unreadable files.
        texts: one caption per image, in the same order.
        tokenizer: strings → token ids [B, L].
        refs: ``refs[i]`` holds image i's reference captions (at least one).
        w: the weight of CLIP-S (2.5 in the paper; 100 for torchmetrics' scale).
        batch_size, device, autocast_dtype, progress: as in `embed_images`.
    """
    count = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
    if count is not None and count != len(texts):
        raise ValueError(f"{len(texts)} captions for {count} images")
    if refs is not None and len(refs) != len(texts):
        raise ValueError(f"{len(refs)} reference lists for {len(texts)} captions")
    run = {"batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype, "progress": progress}
    image_features = embed_images(model, images, **run)
    kept = _kept(images, len(image_features))
    if count is None and len(image_features) != len(texts):
        raise ValueError(f"{len(texts)} captions for {len(image_features)} images")
    text_features = embed_texts(model, tokenizer, [texts[i] for i in kept], **run)
    cosine = _cosine(image_features, text_features)
    clip = w * cosine.clamp(min=0)  # `clip_s` of the pairs, from the cosine already at hand
    probability = match_probability(model, cosine)
    if refs is None:
        return Scores(kept=kept, cosine=cosine, clip_score=clip, w=w, probability=probability)
    flat = [(j, ref) for j, i in enumerate(kept) for ref in refs[i]]
    ref_features = embed_texts(model, tokenizer, [ref for _, ref in flat], **run)
    owner = torch.tensor([j for j, _ in flat], dtype=torch.long, device=text_features.device)
    best = _best_reference_cosine(text_features, ref_features, owner)
    return Scores(kept=kept, cosine=cosine, clip_score=clip, w=w, ref_cosine=best,
                  ref_clip_score=harmonic_mean(clip, best.clamp(min=0)), probability=probability)


def ref_clip_score(
    model: nn.Module,
    images: Iterable[Any],
    texts: Sequence[str],
    refs: Sequence[Sequence[str]],
    *,
    tokenizer: Callable[[list[str]], Tensor],
    **options: Any,
) -> Scores:
    """RefCLIP-S (`Scores.ref_clip_score`, averaged in `Scores.ref_mean`) and CLIP-S of each
    image with its caption; ``refs[i]`` holds image i's reference captions (at least one).
    ``options`` are `clip_score`'s: ``w``, ``batch_size``, ``device``, ``autocast_dtype``, ``progress``."""
    return clip_score(model, images, texts, tokenizer=tokenizer, refs=refs, **options)


def rerank(
    model: nn.Module,
    images: Iterable[Any],
    prompt: str,
    *,
    tokenizer: Callable[[list[str]], Tensor],
    k: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Best-of-N: the images ordered by their cosine with ``prompt``, best first, as (index into
    ``images``, cosine) pairs; the first ``k`` of them when given.

    Ranked by the cosine, not by CLIP-S, whose clamp at 0 would tie every image the prompt fits
    worse than a right angle; the order is also that of a SigLIP model's `match_probability`,
    which increases with the cosine.  Equal cosines keep the input order.  An `ImageLoader`'s
    unreadable files are left out.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be positive, got {k}")
    run = {"batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype, "progress": progress}
    image_features = embed_images(model, images, **run)
    kept = _kept(images, len(image_features))
    text_features = embed_texts(model, tokenizer, [prompt], **run)  # [1, D]
    cosine = (image_features @ text_features[0]).cpu()  # [N], both normalised
    order = torch.sort(cosine, descending=True, stable=True).indices.tolist()
    return [(kept[i], float(cosine[i])) for i in order[:k]]
